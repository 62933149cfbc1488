"""The buffer role of archer-async (imports only archer_async)."""
