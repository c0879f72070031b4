#!/usr/bin/env python3
"""Generates examples/multitask/data: the `extract` task, prompt/completion pairs that turn an
equipment incident report into a one-line JSON record:

    prompt:     INCIDENT 4242 | unit: pump-07 | severity: high
                symptom: seal leak at shaft
                action: replaced seal kit
                status: resolved after 3h
                JSON:
    completion:  {"unit": "pump-07", "severity": "high", "hours": 3}

The other task of the mixture is examples/instruct's support chats. Standard library only,
seeded: re-running it reproduces the committed files byte for byte.
"""
import json
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))
UNITS = ["pump", "valve", "compressor", "conveyor", "chiller", "boiler", "mixer", "press"]
SYMPTOMS = ["pressure drop", "noise at start", "leak under load", "overheating", "vibration",
            "sensor drift", "trip on overload"]
ACTIONS = ["replaced seal", "cleaned filter", "realigned coupling", "reset relay",
           "recalibrated sensor", "tightened mounts"]
SEVERITY = ["low", "medium", "high"]


def example(rng):
    unit = f"{rng.choice(UNITS)}-{rng.randint(1, 20):02d}"
    severity = rng.choice(SEVERITY)
    hours = rng.randint(1, 12)
    report = "\n".join([
        f"INCIDENT {rng.randint(1000, 9999)} | unit: {unit} | severity: {severity}",
        f"symptom: {rng.choice(SYMPTOMS)}",
        f"action: {rng.choice(ACTIONS)}",
        f"status: resolved after {hours}h",
    ])
    record = json.dumps({"unit": unit, "severity": severity, "hours": hours})
    return {"prompt": report + "\nJSON:", "completion": " " + record}


def main():
    rng = random.Random(20261126)
    os.makedirs(os.path.join(HERE, "data"), exist_ok=True)
    for name, n in [("extract_train", 1000), ("extract_eval", 60)]:
        with open(os.path.join(HERE, "data", f"{name}.jsonl"), "w") as f:
            for _ in range(n):
                f.write(json.dumps(example(rng)) + "\n")


if __name__ == "__main__":
    main()
