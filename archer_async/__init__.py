"""archer-async: asynchronous off-policy RL for LLM reasoning with verifiable rewards."""

__version__ = "0.1.0"
