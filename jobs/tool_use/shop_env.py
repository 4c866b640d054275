"""The customer-service environment of the tool_use job: accounts and orders behind four tools.

It runs inside the task's sandbox session: ``python3 shop_env.py call`` reads ``{"name",
"arguments"}`` on stdin, applies the tool to ``db.json`` in the working directory (created from
INITIAL_DB on first use), writes it back and prints the tool's result as JSON;
``python3 shop_env.py state`` prints the database. The agents import it only for the tool
schemas and ``expected_state`` (the reward's reference).
"""

import copy
import json
import sys
from pathlib import Path

INITIAL_DB = {
    "customers": {
        f"C-{i:02d}": {"name": name, "email": f"{name.lower()}@example.com"}
        for i, name in enumerate(["Ada", "Ben", "Cleo", "Dev", "Eli", "Fay", "Gus", "Hana"], start=1)
    },
    "orders": {
        f"O-{1001 + i}": {"customer": f"C-{i % 8 + 1:02d}", "item": item, "total": total, "status": status}
        for i, (item, total, status) in enumerate([
            ("kettle", 35, "delivered"), ("lamp", 20, "processing"), ("chair", 80, "delivered"),
            ("desk", 150, "shipped"), ("mug", 8, "processing"), ("rug", 60, "delivered"),
            ("fan", 25, "processing"), ("toaster", 30, "delivered"), ("clock", 15, "shipped"),
            ("mirror", 45, "processing"), ("shelf", 70, "delivered"), ("pillow", 12, "processing"),
            ("blender", 55, "delivered"), ("vase", 18, "processing"), ("heater", 65, "shipped"),
            ("radio", 40, "delivered"),
        ])
    },
}

_ORDER = {"order_id": {"type": "string", "description": "an order id such as O-1003"}}
TOOLS = [
    {"name": "get_order", "description": "Look up an order: item, total, status, customer.",
     "parameters": {"type": "object", "properties": _ORDER, "required": ["order_id"]}},
    {"name": "refund_order", "description": "Refund a delivered order.",
     "parameters": {"type": "object", "properties": _ORDER, "required": ["order_id"]}},
    {"name": "cancel_order", "description": "Cancel an order that is still processing.",
     "parameters": {"type": "object", "properties": _ORDER, "required": ["order_id"]}},
    {"name": "update_email", "description": "Change a customer's email address.",
     "parameters": {"type": "object", "properties": {
         "customer_id": {"type": "string", "description": "a customer id such as C-02"},
         "email": {"type": "string"}}, "required": ["customer_id", "email"]}},
]


def _order(db: dict, args: dict) -> tuple[dict | None, dict | None]:
    order = db["orders"].get(str(args.get("order_id", "")))
    return (order, None) if order else (None, {"error": f"no order {args.get('order_id')!r}"})


def apply_tool(db: dict, name: str, args: dict) -> dict:
    """Apply one tool call to ``db`` (in place); return its result. Bad calls change nothing."""
    if not isinstance(args, dict):
        return {"error": "arguments must be an object"}
    if name == "update_email":
        customer = db["customers"].get(str(args.get("customer_id", "")))
        email = str(args.get("email", ""))
        if customer is None:
            return {"error": f"no customer {args.get('customer_id')!r}"}
        if "@" not in email:
            return {"error": f"{email!r} is not an email address"}
        customer["email"] = email
        return {"ok": True, "customer": customer}
    if name not in ("get_order", "refund_order", "cancel_order"):
        return {"error": f"unknown tool {name!r}"}
    order, error = _order(db, args)
    if error:
        return error
    if name == "refund_order":
        if order["status"] != "delivered":
            return {"error": f"only delivered orders can be refunded; this one is {order['status']}"}
        order["status"] = "refunded"
    elif name == "cancel_order":
        if order["status"] != "processing":
            return {"error": f"only processing orders can be cancelled; this one is {order['status']}"}
        order["status"] = "cancelled"
    return {"ok": True, "order": order}


def expected_state(changes: dict) -> dict:
    """INITIAL_DB with ``{"orders/O-1003/status": "refunded", ...}`` applied: the goal's end state."""
    db = copy.deepcopy(INITIAL_DB)
    for path, value in changes.items():
        *parents, leaf = path.split("/")
        node = db
        for key in parents:
            node = node[key]
        node[leaf] = value
    return db


def main(argv: list[str]) -> int:
    state = Path("db.json")
    db = json.loads(state.read_text()) if state.exists() else copy.deepcopy(INITIAL_DB)
    if argv[1:] == ["state"]:
        print(json.dumps(db, sort_keys=True))
        return 0
    call = json.load(sys.stdin)
    result = apply_tool(db, call.get("name", ""), call.get("arguments", {}))
    state.write_text(json.dumps(db, sort_keys=True))
    print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
