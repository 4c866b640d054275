"""Agents of the tutor job: the embedded LLM plays student and teacher, the sandbox checks.

student -> checker -> done       (correct, or out of attempts)
           checker -> teacher -> student   (wrong)
"""

import json

from matrix_hpc import DONE, Context

MAX_ATTEMPTS = 3
SAMPLING = {"max_tokens": 48, "temperature": 0.7}

# Runs in the sandbox: evaluates the expression and compares it with the student's number.
CHECK = r"""
import json, re, sys
req = json.load(sys.stdin)
expected = eval(req["expression"], {"__builtins__": {}})
text = req["answer"].replace(",", "")
found = re.findall(r"(?:answer is|=)\s*\**(-?\d+)", text) or re.findall(r"-?\d+", text)
got = found[-1] if found else ""
print(json.dumps({"expected": expected, "got": got, "correct": got != "" and int(got) == expected}))
"""


async def student(t, ctx: Context) -> str:
    messages = [{"role": "system", "content": "You are a student. Answer arithmetic questions with one number."},
                {"role": "user", "content": t.question}]
    for turn in t.turns:
        messages.append({"role": "assistant" if turn.role == "student" else "user", "content": turn.text})
    reply = await ctx.llm("smol").chat(messages, seed=ctx.seed % 2**31, **SAMPLING)
    t.turns.add(role="student", text=reply.text.strip())
    return "checker"


async def checker(t, ctx: Context) -> str:
    request = json.dumps({"expression": t.expression, "answer": t.turns[-1].text})
    result = await ctx.sandbox("py").run(["python3", "-c", CHECK], stdin=request)
    if result.exit_code != 0:
        raise RuntimeError(f"check failed in the sandbox: {result.stderr[-500:]}")
    verdict = json.loads(result.stdout)
    t.checks.add(correct=verdict["correct"], expected=verdict["expected"], got=verdict["got"])
    if verdict["correct"]:
        t.solved = True
        return DONE
    return DONE if len(t.checks) >= MAX_ATTEMPTS else "teacher"


async def teacher(t, ctx: Context) -> str:
    last = t.checks[-1]
    messages = [{"role": "system", "content": "You are a patient math teacher. Give a one-sentence hint, "
                 "without giving the answer."},
                {"role": "user", "content": f"Question: {t.question}\nStudent's answer: {t.turns[-1].text}\n"
                 f"The answer is {'too small' if last.got and int(last.got) < last.expected else 'wrong'}."}]
    reply = await ctx.llm("smol").chat(messages, seed=ctx.seed % 2**31, **SAMPLING)
    t.turns.add(role="teacher", text=reply.text.strip())
    return "student"


def payload(row: dict, cls):
    """Dataset row -> Tutoring: the question and the expression the sandbox evaluates."""
    return cls(question=row["question"], expression=row["question"].removeprefix("What is ").rstrip("?"))
