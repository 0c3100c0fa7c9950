"""English prose for the reproduction: the Python documentation Debian ships, as shuffled documents.

  apt-get install python3.11-doc                        # ~12 MB of reStructuredText, ~3M tokens
  python scripts/corpus.py --out runs/repro/corpus.jsonl

Python's stdlib docstrings (the default job's text) hold only ~300k tokens. The documentation's
sources (/usr/share/doc/python3.11/html/_sources/**/*.rst.txt: the tutorial, HOWTOs, FAQ,
language and library reference, What's New) hold about ten times more, mostly English prose.
Each file is cut at blank lines into documents of about --doc_chars characters, and the
documents are shuffled with a fixed seed, so the harvested (training) contexts and the held-out
ones after them come from the same mix of topics rather than from alphabetically ordered files.
Writes one {"text": ...} line per document (text.source=files reads it) and prints its size.
"""
import argparse
import glob
import json
import os
import random

SOURCES = "/usr/share/doc/python3.11/html/_sources"


def documents(root: str, doc_chars: int) -> list[str]:
  """Every file under root cut at blank lines into documents of about doc_chars characters."""
  paths = sorted(glob.glob(os.path.join(root, "**", "*.rst.txt"), recursive=True))
  if not paths:
    raise SystemExit(f"no *.rst.txt under {root}: install the Python documentation "
                     "(apt-get install python3.11-doc) or pass --sources")
  docs = []
  for path in paths:
    with open(path, encoding="utf-8") as fh:
      paragraphs = fh.read().split("\n\n")
    current = []
    for para in paragraphs:
      current.append(para)
      if sum(len(p) for p in current) >= doc_chars:
        docs.append("\n\n".join(current).strip())
        current = []
    if current and "\n\n".join(current).strip():
      docs.append("\n\n".join(current).strip())
  return docs


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--sources", default=SOURCES)
  p.add_argument("--out", required=True)
  p.add_argument("--doc_chars", type=int, default=4000)
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args()
  docs = documents(args.sources, args.doc_chars)
  random.Random(args.seed).shuffle(docs)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  tmp = args.out + ".tmp"
  with open(tmp, "w", encoding="utf-8") as fh:
    for d in docs:
      fh.write(json.dumps({"text": d}) + "\n")
  os.replace(tmp, args.out)
  print(f"{args.out}: {len(docs)} documents, {sum(map(len, docs)) / 1e6:.1f}M characters")


if __name__ == "__main__":
  main()
