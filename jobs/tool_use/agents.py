"""Agents of the tool_use job (tool-use trajectories in a customer-service environment).

user -> assistant -> env -> assistant -> user -> ... -> reward -> done

- user: a simulator that says the row's scripted lines in order, then ends the episode (-> reward).
- assistant: the LLM with the environment's tools. Answering a user line, it must call one tool
  (tool_choice "required": guided decoding, so even a small model makes a well-formed call);
  after the tool's result it answers in text (tool_choice "none"; a stray call is ignored).
- env: runs each call in the task's sandbox session (shop_env.py over db.json), records the result.
- reward: reads the environment's final state from the session; 1.0 iff it is exactly the goal's.
"""

import importlib.util
import json
from pathlib import Path

from matrix_hpc import DONE, Context
from matrix_hpc.services.sandbox import ServiceError

SAMPLING = {"max_tokens": 48, "temperature": 0.7}
CALL_MAX_TOKENS = 80  # a forced call is JSON: cut short, it would not parse
SYSTEM = ("You are a customer-service assistant for an online shop. Use the tools to look up, refund "
          "or cancel orders and to update email addresses, then tell the customer what you did.")
_ENV_FILE = Path(__file__).with_name("shop_env.py")
ENV_SOURCE = _ENV_FILE.read_text()


def load_shop_env():
    spec = importlib.util.spec_from_file_location("tool_use_shop_env", _ENV_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


shop_env = load_shop_env()


def user(e, ctx: Context) -> str:
    if e.user_turns >= len(e.user_script):
        return "reward"
    e.messages.add(role="user", content=e.user_script[e.user_turns])
    e.user_turns += 1
    return "assistant"


def _chat_messages(e) -> list[dict]:
    out = [{"role": "system", "content": SYSTEM}]
    for m in e.messages:
        msg = {"role": m.role, "content": m.content}
        if m.tool_calls:
            msg["tool_calls"] = [{"id": c.id, "type": "function",
                                  "function": {"name": c.name, "arguments": c.arguments_json}}
                                 for c in m.tool_calls]
        if m.tool_call_id:
            msg["tool_call_id"] = m.tool_call_id
        out.append(msg)
    return out


async def assistant(e, ctx: Context) -> str:
    must_call = e.messages[-1].role == "user"
    reply = await ctx.llm("smol").chat(_chat_messages(e), tools=shop_env.TOOLS,
                                       tool_choice="required" if must_call else "none",
                                       seed=ctx.seed % 2**31 + ctx.step,
                                       **{**SAMPLING, **({"max_tokens": CALL_MAX_TOKENS} if must_call else {})})
    if must_call and reply.tool_calls:
        turn = e.messages.add(role="assistant", content=reply.text.strip())
        for call in reply.tool_calls:
            turn.tool_calls.add(id=call.id, name=call.name, arguments_json=call.arguments_json)
        return "env"
    e.messages.add(role="assistant", content=reply.text.strip() or "(no answer)")
    return "user"


async def _in_session(e, ctx: Context, command: list[str], stdin: str = ""):
    """Run ``command`` in the task's environment session, opening (or reopening) it as needed:
    a session lost with a restart is rebuilt from the state the payload carries."""
    client = ctx.sandbox("env")
    if e.session_id:
        try:
            return await client.session(e.session_address, e.session_id).exec(command, stdin=stdin)
        except ServiceError as err:
            if err.code != "NOT_FOUND":
                raise
    files = {"shop_env.py": ENV_SOURCE, **({"db.json": e.db_json} if e.db_json else {})}
    session = await client.open_session(files=files)
    e.session_id, e.session_address = session.id, session.address
    return await session.exec(command, stdin=stdin)


async def env(e, ctx: Context) -> str:
    turn = e.messages[-1]
    for call in turn.tool_calls:
        request = json.dumps({"name": call.name, "arguments": json.loads(call.arguments_json or "{}")})
        result = await _in_session(e, ctx, ["python3", "shop_env.py", "call"], stdin=request)
        if result.exit_code != 0:
            raise RuntimeError(f"the environment failed: {result.stderr[-500:]}")
        call.result_json = result.stdout.strip()
        e.messages.add(role="tool", content=call.result_json, tool_call_id=call.id)
    state = await _in_session(e, ctx, ["python3", "shop_env.py", "state"])
    e.db_json = state.stdout.strip()
    return "assistant"


async def reward(e, ctx: Context) -> str:
    state = await _in_session(e, ctx, ["python3", "shop_env.py", "state"])
    if state.exit_code != 0:
        raise RuntimeError(f"the environment failed: {state.stderr[-500:]}")
    final = json.loads(state.stdout)
    e.final_state_json = json.dumps(final, sort_keys=True)
    e.reward = 1.0 if final == shop_env.expected_state(json.loads(e.goal_changes_json)) else 0.0
    return DONE


def payload(row: dict, cls):
    """Dataset row -> Episode: the user's lines and the goal's changes to the environment."""
    return cls(user_script=row["user"], goal_changes_json=json.dumps(row["goal"], sort_keys=True))
