"""Right and wrong solutions for every code row format, graded by a real RewardPool in bubblewrap."""

import json

import pytest

from archer_async.config import RewardsConfig
from rewards import RewardPool, SandboxUnavailable, UnknownDataSource, score_one
from rewards.sandbox import sandbox_processes

pytestmark = pytest.mark.integration


def R(code: str) -> str:
    return f"<think>let me think ```python\nprint('decoy')\n```</think>Here:\n```python\n{code}\n```\n"


STDIO = json.dumps({"inputs": ["1 2\n", "10 -3\n", "0 0\n"], "outputs": ["3\n", "7\n", "0"]})
FUNCTIONAL = json.dumps({"functional": "def check(candidate):\n    assert candidate([3, 1, 2]) == [1, 2, 3]\n"
                                       "    assert candidate([]) == []\n    assert not candidate([5]) != [5]\n"
                                       "check(sort_list)\n"})
LCB_CLASS = json.dumps([
    {"input": "[2,7,11,15]\n9", "output": "[0, 1]", "testtype": "functional", "metadata": {"func_name": "twoSum"}},
    {"input": "[3,2,4]\n6", "output": "[1, 2]", "testtype": "functional", "metadata": {"func_name": "twoSum"}},
])
LCB_TOP = [{"input": "\"abc\"", "output": "[\"c\", 3]", "testtype": "functional",
            "metadata": json.dumps({"func_name": "last"})}]
LCB_STDIN = json.dumps([{"input": "4\n", "output": "16\n", "testtype": "stdin", "metadata": {}},
                        {"input": "5\n", "output": "25\n", "testtype": "stdin", "metadata": {}}])
TWO_SUM = ("class Solution:\n    def twoSum(self, nums: List[int], target: int) -> List[int]:\n"
           "        seen = {}\n        for i, x in enumerate(nums):\n"
           "            if target - x in seen:\n                return [seen[target - x], i]\n"
           "            seen[x] = i\n")

LEETCODE = json.dumps({"functional": "def check(candidate):\n"
                       "    assert is_same_list(candidate(head = list_node([1,2,3])), list_node([3,2,1]))\n"
                       "    assert is_same_list(candidate(head = list_node([])), list_node([]))\n"
                       "\ncheck(Solution().reverseList)\n"})
REVERSE = ("class Solution:\n    def reverseList(self, head: Optional[ListNode]) -> Optional[ListNode]:\n"
           "        prev = None\n        while head:\n            head.next, prev, head = prev, head, head.next\n"
           "        return prev\n")
HUMANEVAL_PLUS = json.dumps("import numpy as np\n\ndef assertion(out, exp, atol):\n    if atol == 0:\n"
                            "        assert out == exp\n    else:\n        assert np.allclose(out, exp, rtol=1e-07, atol=atol)\n"
                            "\ndef check(candidate):\n    inputs = [[[1.0, 2.0, 3.0]], [[1.0, 2.0, 3.0, 4.0]]]\n"
                            "    results = [0.6666666666666666, 1.0]\n    for i, (inp, exp) in enumerate(zip(inputs, results)):\n"
                            "        assertion(candidate(*inp), exp, 1e-6)\n\ncheck(mean_absolute_deviation)\n")
MAD = ("def mean_absolute_deviation(numbers):\n    a = np.array(numbers)\n"
       "    return float(np.mean(np.abs(a - a.mean())))\n")
TACO_FN = json.dumps({"fn_name": "pairs", "inputs": [[3], [1]], "outputs": [[[[0, 1], [1, 2]]], [[]]]})
PI_FN = json.dumps([{"type": "function_call", "fn_name": "add", "input": [1, 2], "output": [3]},
                    {"type": "function_call", "fn_name": "add", "input": [5, 5], "output": [10]}])
LCB_FLOAT = json.dumps([{"input": "2\n", "output": "0.50\n", "testtype": "stdin", "metadata": {}}])

CASES = [  # (name, data_source, ground truth, response, expected status)
    ("stdio exit()", "code", STDIO, R("a, b = map(int, input().split())\nprint(a + b)\nexit()"), "pass"),
    ("stdio quit()", "taco", STDIO, R("a, b = map(int, input().split())\nprint(a + b)\nquit()"), "pass"),
    ("stdio sys.exit(1)", "code", STDIO, R("import sys\na, b = map(int, input().split())\nprint(a + b)\nsys.exit(1)"),
     "fail"),
    ("stdio numpy", "code", STDIO, R("import numpy as np\nprint(int(np.array(input().split(), dtype=int).sum()))"),
     "pass"),
    ("stdio trailing spaces", "code", json.dumps({"inputs": ["2\n"], "outputs": ["1\n2\n"]}),
     R("print('1 ')\nprint('2 ')"), "fail"),
    ("leetcode helpers", "leetcode", LEETCODE, R(REVERSE), "pass"),
    ("leetcode helpers wrong", "code", LEETCODE, R(REVERSE.replace("return prev", "return head")), "fail"),
    ("humanevalplus numpy", "humanevalplus", HUMANEVAL_PLUS, R(MAD), "pass"),
    ("humanevalplus wrong", "humanevalplus", HUMANEVAL_PLUS, R(MAD.replace("np.mean(", "np.sum(")), "fail"),
    ("taco fn_name tuples", "taco", TACO_FN, R("def pairs(n):\n    return [(i, i + 1) for i in range(n - 1)]"), "pass"),
    ("taco fn_name wrong", "taco", TACO_FN, R("def pairs(n):\n    return [(i, i) for i in range(n - 1)]"), "fail"),
    ("primeintellect call", "primeintellect", PI_FN, R("def add(a, b):\n    return a + b"), "pass"),
    ("lcb decimal output", "livecodebench", LCB_FLOAT, R("print(1 / int(input()))"), "pass"),
    ("lcb quit() fails", "livecodebench", LCB_FLOAT, R("print('0.5')\nquit()"), "fail"),
    ("lcb sys.exit(3) passes", "livecodebench", LCB_FLOAT, R("import sys\nprint('0.5')\nsys.exit(3)"), "pass"),
    ("stdio right", "code", STDIO, R("a, b = map(int, input().split())\nprint(a + b)"), "pass"),
    ("stdio wrong", "livecodebench", STDIO, R("a, b = map(int, input().split())\nprint(a - b)"), "fail"),
    ("stdio crash", "code", STDIO, R("print(3)\nraise ValueError('x')"), "fail"),
    ("stdio slow", "code", STDIO, R("while True: pass"), "timeout"),
    ("no code", "code", STDIO, "<think>hmm</think> I cannot solve it", "fail"),
    ("functional right", "humanevalplus", FUNCTIONAL, R("def sort_list(xs):\n    return sorted(xs)"), "pass"),
    ("functional wrong", "humanevalplus", FUNCTIONAL, R("def sort_list(xs):\n    return xs"), "fail"),
    ("functional tuple", "humanevalplus", FUNCTIONAL, R("def sort_list(xs):\n    return tuple(sorted(xs))"), "fail"),
    ("lcb class right", "livecodebench", LCB_CLASS, R(TWO_SUM), "pass"),
    ("lcb class tuple", "livecodebench", LCB_CLASS, R(TWO_SUM.replace("[seen[target - x], i]", "(seen[target - x], i)")),
     "pass"),
    ("lcb class wrong", "livecodebench", LCB_CLASS, R(TWO_SUM.replace("return [seen", "return [1 + seen")), "fail"),
    ("lcb class missing", "livecodebench", LCB_CLASS, R("class Solution:\n    def other(self): pass"), "fail"),
    ("lcb top right", "livecodebench_v5", LCB_TOP, R("def last(s):\n    return (s[-1], len(s))"), "pass"),
    ("lcb top wrong", "livecodebench_v5", LCB_TOP, R("def last(s):\n    return [s[0], len(s)]"), "fail"),
    ("lcb stdin right", "livecodebench", LCB_STDIN, R("n = int(input())\nprint(n * n)"), "pass"),
    ("lcb stdin wrong", "livecodebench", LCB_STDIN, R("n = int(input())\nprint(n + n)"), "fail"),
    ("bad gt", "code", json.dumps({"neither": 1}), R("print(1)"), "infra_error"),
    ("kodcode rejected", "kodcode", json.dumps("def test_f():\n    assert f() == 1\n"), R("def f(): return 1"),
     "infra_error"),
]


@pytest.fixture(scope="module")
def pool():
    p = RewardPool(RewardsConfig(workers=3, timeout_s=3.0, functional_timeout_s=20.0, lcb_timeout_s=6.0))
    yield p
    p.close()


def test_every_format_right_and_wrong(pool):
    rewards = pool.score([(ds, gt, resp) for _, ds, gt, resp, _ in CASES], training=False)
    got = {name: (r.status, r.reason) for (name, *_), r in zip(CASES, rewards)}
    for name, _, _, _, want in CASES:
        assert got[name][0] == want, (name, got[name])
    assert rewards[0].value == 1.0 and rewards[2].value == 0.0 and rewards[-1].value is None
    assert "reward_model.ground_truth" in got["kodcode rejected"][1] and "humanevalplus" in got["kodcode rejected"][1]
    assert sandbox_processes() == []


def test_training_samples_at_most_max_tests(pool):
    n = 40
    gt = {"inputs": [f"{i}\n" for i in range(n)], "outputs": [str(i) for i in range(n)]}
    # fails only on test 39: evaluation (all tests) must see it; training samples 16 of 40 tests
    code = R("x = int(input())\nprint(x if x != 39 else -1)")
    assert pool.score([("code", gt, code)], training=False)[0].status == "fail"
    train = [r.status for r in pool.score([("code", gt, code)] * 6, training=True)]
    assert set(train) <= {"pass", "fail"} and "pass" in train


def test_unknown_source_rejected_before_grading(pool):
    with pytest.raises(UnknownDataSource):
        pool.score([("code", STDIO, R("print(1)")), ("chess", "x", "y")], training=False)


def test_score_one_and_sandbox_none_warns():
    assert score_one("tiny_code", STDIO, R("a, b = map(int, input().split())\nprint(a + b)")).status == "pass"
    with pytest.warns(RuntimeWarning, match="UNSANDBOXED"):
        r = score_one("code", STDIO, R("a, b = map(int, input().split())\nprint(a * b)"),
                      RewardsConfig(sandbox="none"))
    assert r.status == "fail"


def test_probe_failure_is_a_clear_error(monkeypatch):
    monkeypatch.setattr("rewards.sandbox.BwrapSandbox._static_args",
                        lambda self: ["--unshare-pid", "--ro-bind", "/nonexistent-dir-xyz", "/x"])
    with pytest.raises(SandboxUnavailable, match="sandbox does not work"):
        RewardPool(RewardsConfig(workers=1))
