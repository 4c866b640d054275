"""The reference's dummy coral agents (fair-matrix 0.2.6, ts_interaction_dummy.py), as matrix-hpc agents."""

from matrix_hpc import DONE, Context

_BASE_TEXT = (
    "To find the amount of trade discount, we need to subtract the net price from the list price. "
    "List price equals four dollars and ninety five cents. Net price equals two dollars and ninety five cents. "
    "Trade discount equals list price minus net price. Therefore the trade discount is two dollars. "
    "So the amount of trade discount is two dollars. The correct answer is option I. "
    "Let me verify this calculation by working through the problem step by step. "
    "First we identify the given values in the problem. The list price is the original price before any discounts. "
    "The net price is what the customer actually pays after the discount is applied. "
    "To find the discount amount we simply subtract the net price from the list price. "
    "This gives us the total savings or discount that was applied to the purchase. "
    "In this case the calculation shows that the customer saved two dollars on this transaction. "
)
GENERATION_LENGTH, LENGTH_DELTA, EXPECTED_TURNS, MAX_TURNS = 1024, 0.2, 3, 20


def speaker(d, ctx: Context) -> str:
    """Teacher and student: a reply of 80-120% of 1,024 characters."""
    n = ctx.random.randint(int(GENERATION_LENGTH * (1 - LENGTH_DELTA)), int(GENERATION_LENGTH * (1 + LENGTH_DELTA)))
    d.turns.add(role=ctx.role, text=(_BASE_TEXT * (n // len(_BASE_TEXT) + 1))[:n])
    return "extractor"


def extractor(d, ctx: Context) -> str:
    d.turns.add(role="extractor", text=f"({ctx.random.choice('ABCDEFGHIJ'[:max(1, len(d.options))])})")
    return "matcher"


def matcher(d, ctx: Context) -> str:
    d.rated += 1
    d.agreement = ctx.random.randint(1, 10) == 1 if d.rated < EXPECTED_TURNS else ctx.random.randint(1, 10) <= 9
    if d.agreement or d.rated >= MAX_TURNS:
        return DONE
    last_speaker = next(t.role for t in reversed(d.turns) if t.role in ("teacher", "student"))
    return "student" if last_speaker == "teacher" else "teacher"
