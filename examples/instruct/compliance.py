#!/usr/bin/env python3
"""Format compliance of a model on the held-out questions of examples/instruct.

For each held-out conversation, `worker generate --chat` answers the user's question (greedy,
with chat_template.jinja, the template the example trains with). An answer complies when it has
the five lines of the trained structure, in order; separately we count answers whose `Order:`
line repeats the order id of the question (copying facts, which a tiny model learns later than
the structure). Prints one JSON object:
{"model", "answers", "compliant", "rate", "order_copied"}.

Usage: compliance.py WORKER_BINARY MODEL_DIR [--limit N]
"""
import json
import os
import re
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
STRUCTURE = [
    re.compile(r"^Thank you for contacting Acme support\.$"),
    re.compile(r"^Issue: [a-z]+ [a-z ]+$"),
    re.compile(r"^Order: A\d{5}$"),
    re.compile(r"^Next step: [a-z][a-z ]+$"),
    re.compile(r"^Reference: CASE-\d{3}$"),
]


def complies(answer):
    lines = answer.strip().split("\n")
    return len(lines) == len(STRUCTURE) and all(p.match(l) for p, l in zip(STRUCTURE, lines))


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--limit")]
    limit = None
    if "--limit" in sys.argv:
        limit = int(sys.argv[sys.argv.index("--limit") + 1])
        args.remove(str(limit))
    worker, model = args[0], args[1]
    with open(os.path.join(HERE, "data", "eval.jsonl")) as f:
        conversations = [json.loads(line)["messages"] for line in f if line.strip()]
    if limit is not None:
        conversations = conversations[:limit]
    compliant = copied = 0
    for messages in conversations:
        question = next(m["content"] for m in messages if m["role"] == "user")
        order = re.search(r"A\d{5}", question).group(0)
        out = subprocess.run(
            [worker, "generate", "--model", model, "--chat",
             "--chat-template", os.path.join(HERE, "chat_template.jinja"),
             "--prompt", question, "--max-new-tokens", "200"],
            check=True, capture_output=True, text=True,
        ).stdout
        compliant += complies(out)
        copied += f"\nOrder: {order}\n" in out
    n = len(conversations)
    print(json.dumps({"model": model, "answers": n, "compliant": compliant,
                      "rate": compliant / n if n else 0.0, "order_copied": copied}))


if __name__ == "__main__":
    main()
