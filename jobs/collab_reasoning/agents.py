"""Agents of the collab_reasoning job (the paper's collaborative-reasoning dialogues).

student -> teacher -> extractor -> matcher -> student ...   until they agree or MAX_ROUNDS

The student and the teacher are the LLM; the extractor is the LLM too, held to a JSON schema
(guided decoding), so even a small model's reply parses; whatever it cannot place is "none",
which never agrees. The matcher is plain Python.
"""

import asyncio
import json

from matrix_hpc import DONE, Context

MAX_ROUNDS = 3
LETTERS = ("A", "B", "C", "D")
NONE = "none"
SAMPLING = {"max_tokens": 48, "temperature": 0.7}
ANSWER_SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "string", "enum": [*LETTERS, NONE]}},
    "required": ["answer"],
}


def question_text(d) -> str:
    options = "\n".join(f"{letter}. {choice}" for letter, choice in zip(LETTERS, d.choices, strict=False))
    return f"{d.question}\n{options}"


def _dialogue(d, me: str) -> list[dict]:
    """The discussion so far from one side's point of view: its own turns are the assistant's."""
    return [{"role": "assistant" if t.role == me else "user", "content": t.text} for t in d.turns]


async def student(d, ctx: Context) -> str:
    messages = [{"role": "system", "content": "You are a student. Answer the multiple-choice question "
                 "in one or two sentences and name the letter of your choice."},
                {"role": "user", "content": question_text(d)}, *_dialogue(d, "student")]
    reply = await ctx.llm("smol").chat(messages, seed=ctx.seed % 2**31 + ctx.step, **SAMPLING)
    d.turns.add(role="student", text=reply.text.strip())
    return "teacher"


async def teacher(d, ctx: Context) -> str:
    messages = [{"role": "system", "content": "You are a teacher discussing a multiple-choice question "
                 "with a student. Say whether you agree with the student's choice, and name the letter "
                 f"you think is right.\n\nThe question:\n{question_text(d)}"},
                *_dialogue(d, "teacher")]
    reply = await ctx.llm("smol").chat(messages, seed=ctx.seed % 2**31 + ctx.step, **SAMPLING)
    d.turns.add(role="teacher", text=reply.text.strip())
    return "extractor"


def parse_answer(text: str) -> str:
    """The extractor's JSON reply -> a letter, or "none" for anything malformed."""
    try:
        answer = json.loads(text).get("answer")
    except (ValueError, AttributeError):
        return NONE
    return answer if isinstance(answer, str) and answer in LETTERS else NONE


async def _extract(d, turn_text: str, ctx: Context) -> str:
    prompt = (f"Question:\n{question_text(d)}\n\nReply:\n{turn_text}\n\n"
              "Which option letter does the reply choose? Use \"none\" if it chooses none.")
    reply = await ctx.llm("smol").chat(prompt, json_schema=ANSWER_SCHEMA, max_tokens=16, temperature=0.0)
    return parse_answer(reply.text)


async def extractor(d, ctx: Context) -> str:
    student_turn, teacher_turn = d.turns[-2].text, d.turns[-1].text
    s, t = await asyncio.gather(_extract(d, student_turn, ctx), _extract(d, teacher_turn, ctx))
    d.rounds.add(student_answer=s, teacher_answer=t)
    return "matcher"


def matcher(d, ctx: Context) -> str:
    last = d.rounds[-1]
    last.agreed = last.student_answer == last.teacher_answer != NONE
    if not last.agreed and len(d.rounds) < MAX_ROUNDS:
        return "student"
    d.agreed = last.agreed
    d.final_answer = last.student_answer if last.agreed else ""
    d.correct = d.agreed and d.final_answer == d.key
    return DONE
