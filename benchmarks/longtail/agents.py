"""The long-tail multi-turn workload: one role that talks to the LLM for the row's number of turns."""

from matrix_hpc import DONE, Context


async def talker(conv, ctx: Context) -> str:
    history = [{"role": "user", "content": f"Tell me about {conv.topic}."}]
    for reply in conv.replies:
        history += [{"role": "assistant", "content": reply}, {"role": "user", "content": "Go on."}]
    result = await ctx.llm("smol").chat(history, max_tokens=1024, seed=ctx.seed % 2**31)
    conv.replies.append(result.text)
    return "talker" if len(conv.replies) < conv.turns else DONE
