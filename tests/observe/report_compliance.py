"""Reads report.md's side-by-side answers and applies examples/instruct/compliance.py's structure
check to each column. Prints one JSON object: {"samples", "base_compliant", "tuned_compliant", "base_opening", "tuned_opening"}.

usage: report_compliance.py REPORT_MD
"""
import html
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "examples", "instruct"))
from compliance import STRUCTURE, complies  # noqa: E402


def opens(answer):
    return bool(STRUCTURE[0].match(answer.strip().split("\n")[0]))

ROW = re.compile(r'<tr valign="top"><td><pre>(.*?)</pre></td><td><pre>(.*?)</pre></td>'
                 r'<td><pre>(.*?)</pre></td></tr>', re.S)


def main():
    with open(sys.argv[1]) as f:
        rows = [[html.unescape(c) for c in m] for m in ROW.findall(f.read())]
    print(json.dumps({
        "samples": len(rows),
        "base_compliant": sum(complies(base) for base, _, _ in rows),
        "tuned_compliant": sum(complies(tuned) for _, tuned, _ in rows),
        # The structure's opening line alone: what a model learns first.
        "base_opening": sum(opens(base) for base, _, _ in rows),
        "tuned_opening": sum(opens(tuned) for _, tuned, _ in rows),
    }))


if __name__ == "__main__":
    main()
