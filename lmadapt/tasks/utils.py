"""Documents of a local text file for the lmadapt_wikitext_local tasks (no hub access).

The file comes from the task metadata key `task_file` (`lmadapt harness --task-file PATH`,
or `metadata={"task_file": PATH}` in lm_eval.simple_evaluate / TaskManager), else from
the environment variable LMADAPT_TASK_FILE. A file with WikiText top-level headings
(" = Title = ") is cut into pages at them, as EleutherAI/wikitext_document_level cuts
the WikiText releases; any other file is one document per stretch of text between
blank lines. The metrics are the stock wikitext task's (words and bytes counted on the
page as read, before detokenization).
"""

from __future__ import annotations

import os
import re

from lm_eval.tasks.wikitext.preprocess_wikitext import process_results, wikitext_detokenizer  # noqa: F401

ENV = "LMADAPT_TASK_FILE"
_HEADING = re.compile(r"^ = [^=].* = $")


def split_documents(text: str) -> list[str]:
    lines = text.split("\n")
    if any(_HEADING.match(line) for line in lines):
        pages, current = [], []
        for line in lines:
            if _HEADING.match(line) and any(x.strip() for x in current):
                pages.append("\n".join(current))
                current = []
            current.append(line)
        if any(x.strip() for x in current):
            pages.append("\n".join(current))
        return pages
    return [d.strip("\n") + "\n" for d in re.split(r"\n\s*\n", text) if d.strip()]


def load_local(task_file=None, **_):
    import datasets

    path = task_file or os.environ.get(ENV)
    if not path:
        raise ValueError(f"the lmadapt_wikitext_local tasks need a file: `lmadapt harness --task-file PATH`, "
                         f"metadata={{'task_file': PATH}} or ${ENV}")
    with open(path, encoding="utf-8") as f:
        docs = split_documents(f.read())
    if not docs:
        raise ValueError(f"{path}: no text")
    return datasets.DatasetDict({"test": datasets.Dataset.from_dict({"page": docs})})


def tokenized_form(doc):
    return doc["page"]
