"""Agents of the code_verify job (verified code generation: the paper's container scenario).

coder -> tester -> done            (tests pass, or MAX_ATTEMPTS used)
         tester -> coder           (failed: the coder sees its code and the error)

The tester runs the problem's tests in a sandbox session (no network, limits). A reply with no
code in it is a failed attempt ("no code in the reply"), never a crash.
"""

import re

from matrix_hpc import DONE, Context

MAX_ATTEMPTS = 3
SAMPLING = {"max_tokens": 128, "temperature": 0.7}
PASSED = "ALL TESTS PASSED"
LIMITS = {"wall_time_s": 10, "cpu_time_s": 10, "memory_bytes": 256 * 1024**2}
_FENCE = re.compile(r"```(?:python|py)?\s*\n(.*?)(?:```|$)", re.S)


def extract_code(reply: str, signature: str) -> str:
    """The first fenced block, else the text from the function's `def` on; "" if neither."""
    fenced = [block for block in _FENCE.findall(reply) if "def " in block]
    if fenced:
        return fenced[0].strip() + "\n"
    name = signature.split("(")[0]  # "def add"
    start = reply.find(name)
    return reply[start:].strip() + "\n" if start >= 0 else ""


def test_file(tests) -> str:
    return "from solution import *\n\n" + "\n".join(tests) + f"\nprint({PASSED!r})\n"


async def coder(t, ctx: Context) -> str:
    messages = [{"role": "system", "content": "You are a Python programmer. Reply with the complete "
                 "function in one ```python code block, nothing else."},
                {"role": "user", "content": f"{t.problem}\nStart with: {t.signature}"}]
    if t.attempts:
        last = t.attempts[-1]
        messages += [{"role": "assistant", "content": last.reply},
                     {"role": "user", "content": f"That failed:\n{last.error}\nFix the function."}]
    reply = await ctx.llm("smol").chat(messages, seed=ctx.seed % 2**31 + ctx.step, **SAMPLING)
    t.attempts.add(reply=reply.text, code=extract_code(reply.text, t.signature))
    return "tester"


async def tester(t, ctx: Context) -> str:
    attempt = t.attempts[-1]
    if not attempt.code:
        attempt.exit_code, attempt.error = -1, "no code in the reply"
    else:
        files = {"solution.py": attempt.code, "test_solution.py": test_file(t.tests)}
        async with await ctx.sandbox("py").open_session(files=files, limits=LIMITS) as session:
            result = await session.exec(["python3", "test_solution.py"])
        attempt.exit_code = result.exit_code
        attempt.passed = result.exit_code == 0 and result.stdout.strip().endswith(PASSED)
        if not attempt.passed:
            hit = f"limit hit: {result.limit_hit}\n" if result.limit_hit else ""
            attempt.error = hit + (result.stderr.strip()[-600:] or result.stdout.strip()[-600:])
    t.passed = attempt.passed
    return DONE if attempt.passed or len(t.attempts) >= MAX_ATTEMPTS else "coder"
