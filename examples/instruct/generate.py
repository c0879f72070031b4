#!/usr/bin/env python3
"""Generates examples/instruct/data: customer-support chats whose answers follow one fixed
structure and tone (what instruction fine-tuning is good at teaching):

    Thank you for contacting Acme support.
    Issue: <product> <problem>
    Order: <order id from the question>
    Next step: <action for that problem>
    Reference: CASE-<number>

Questions vary in wording, politeness, order of facts and an optional system message; the
held-out set uses the same products but new orders and phrasings. Standard library only, seeded:
re-running it reproduces the committed files byte for byte.
"""
import json
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))

PRODUCTS = {
    "kettle": [("does not heat", "reset the base switch and try again"),
               ("leaks from the spout", "send it back for a free replacement")],
    "router": [("keeps dropping wifi", "update the firmware from the app"),
               ("will not power on", "try the spare power adapter")],
    "blender": [("smells of burning", "stop using it and request a refund"),
                ("blade is loose", "tighten the blade ring by hand")],
    "headphones": [("left side is silent", "clean the jack and re-pair them"),
                   ("battery drains fast", "install the battery update")],
    "lamp": [("flickers at night", "replace the bulb with the spare one"),
             ("switch is stuck", "send it back for a free replacement")],
}
OPENERS = ["Hi,", "Hello,", "Hey there.", "Good morning,", "Dear support,", ""]
ASKS = ["Can you help?", "What should I do?", "Please advise.", "Any ideas?", "Help!"]
WHEN = ["since yesterday", "since last week", "after two days", "from the start", "since Monday"]
SYSTEMS = ["You are Acme's support assistant.", "Answer as Acme support, briefly."]


def question(rng, product, problem, order):
    facts = [f"my {product} {problem} {rng.choice(WHEN)}.", f"Order {order}."]
    rng.shuffle(facts)
    parts = [rng.choice(OPENERS), facts[0][0].upper() + facts[0][1:], facts[1], rng.choice(ASKS)]
    return " ".join(p for p in parts if p)


def answer(product, problem, order, action, case):
    return "\n".join([
        "Thank you for contacting Acme support.",
        f"Issue: {product} {problem}",
        f"Order: {order}",
        f"Next step: {action}",
        f"Reference: CASE-{case}",
    ])


def example(rng):
    product = rng.choice(sorted(PRODUCTS))
    problem, action = rng.choice(PRODUCTS[product])
    order = f"A{rng.randint(10000, 99999)}"
    messages = []
    if rng.random() < 0.3:
        messages.append({"role": "system", "content": rng.choice(SYSTEMS)})
    messages.append({"role": "user", "content": question(rng, product, problem, order)})
    messages.append({"role": "assistant",
                     "content": answer(product, problem, order, action, rng.randint(100, 999))})
    return {"messages": messages}


def main():
    rng = random.Random(20261125)
    os.makedirs(os.path.join(HERE, "data"), exist_ok=True)
    for name, n in [("train", 1200), ("eval", 60)]:
        with open(os.path.join(HERE, "data", f"{name}.jsonl"), "w") as f:
            for _ in range(n):
                f.write(json.dumps(example(rng)) + "\n")


if __name__ == "__main__":
    main()
