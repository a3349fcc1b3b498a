"""Write the shipped evaluation tasks' data (configs/eval/data/*.jsonl) from held-out Shakespeare.

usage: python tools/eval_tasks.py [--count N]

The documents come from the embedded corpus (`cascade_mega.data.shakespeare.documents`); the
last 8 of its ~200 documents lie in the quickstart's validation split (`data.split: 95,5,0`
keeps the last 5 % of documents out of training), so no example was trained on. Lines of at
least five words are used, speaker names and stage directions left out. Deterministic (seed 0):
rerunning it rewrites the same files.

  shakespeare_next_line  multiple choice: two lines of a play, which of four lines comes next
                         (the true one and three lines from elsewhere in the held-out text)
  shakespeare_cloze      the last word of a line given the line before and the line's start
"""

import argparse
import json
import os
import random
import re

from cascade_mega.data.shakespeare import documents

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELD_OUT = 8


def verse_lines(doc: str):
    """Runs of consecutive spoken lines (a new run at each blank line)."""
    run = []
    for line in doc.split("\n"):
        line = line.strip()
        words = line.split()
        if len(words) < 5 or line.isupper() or line.startswith(("[", "Enter", "Exit", "Exeunt")):
            if run:
                yield run
            run = []
            continue
        run.append(line)
    if run:
        yield run


def main(count: int) -> None:
    rng = random.Random(0)
    runs = [r for doc in list(documents())[-HELD_OUT:] for r in verse_lines(doc)]
    pool = [line for r in runs for line in r]
    triples = [r[i:i + 3] for r in runs for i in range(len(r) - 2)]
    rng.shuffle(triples)
    next_line, cloze = [], []
    for a, b, c in triples[:count]:
        choices = [c] + rng.sample([x for x in pool if x != c], 3)
        rng.shuffle(choices)
        next_line.append({"context": f"{a}\n{b}\n", "choices": choices, "gold": choices.index(c)})
    for a, b, c in triples[count:]:
        match = re.match(r"^(.*\S)\s+([A-Za-z']+)[^A-Za-z']*$", c)
        if match and len(cloze) < count:
            cloze.append({"context": f"{a}\n{b}\n{match.group(1)}", "target": match.group(2)})
    for name, rows in (("shakespeare_next_line", next_line), ("shakespeare_cloze", cloze)):
        path = os.path.join(ROOT, "configs", "eval", "data", f"{name}.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        print(f"wrote {len(rows)} examples to {os.path.relpath(path, ROOT)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100)
    main(parser.parse_args().count)
