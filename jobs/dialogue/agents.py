"""Agents of the dialogue example: plain Python, no services.

The student guesses (sometimes wrongly, seeded per task), the teacher checks against the answer
key and gives a hint; they take turns until the teacher agrees or the turn limit is reached.
"""

from matrix_hpc import DONE, Context

MAX_TURNS = 6


async def student(d, ctx: Context) -> str:
    hint = d.turns[-1].text if d.turns else ""
    if "higher" in hint or "lower" in hint:
        last = int(d.turns[-2].text.split()[-1])
        guess = last + (1 if "higher" in hint else -1) * max(1, abs(d.answer - last) // 2)
    else:
        guess = d.answer + ctx.random.choice([-3, -1, 0, 0, 2])
    d.turns.add(role="student", text=f"My answer is {guess}")
    return "teacher"


async def teacher(d, ctx: Context) -> str:
    guess = int(d.turns[-1].text.split()[-1])
    limit = d.max_turns or MAX_TURNS
    if guess == d.answer:
        d.agreed = True
        d.turns.add(role="teacher", text="Correct, well done.")
        return DONE
    if len(d.turns) >= limit:
        d.turns.add(role="teacher", text=f"Not quite; the answer is {d.answer}.")
        return DONE
    d.turns.add(role="teacher", text="Try higher." if guess < d.answer else "Try lower.")
    return "student"
