"""The measured tables in the docs are the figures of the results files under bench/.

Every table in docs/results.md (and any table elsewhere in docs/ or the README that
carries the same comment) is preceded by an HTML comment naming its source:

    <!-- results
    files: t=bench/table2/results/ptb/table.json
    rows: lstm, cache, mbpa
    cols: - | [t/rows/{row}/test/ppl] | ?100 * ([t/rows/{row}/test/ppl] / [t/rows/lstm/test/ppl] - 1)
    -->

`files` gives each results file an alias; `rows` the key of each table row, in order,
separated by commas (by semicolons when a key holds a comma), substituted for {row}; a row
written `SRC:KEY` also sets {src}, for tables whose rows come from different files; `cols`
one spec per column, separated by `|`:

* `-`: not a measured figure (labels, settings, the paper's figures);
* otherwise one arithmetic expression per number in the cell (several separated by `;`),
  over references `[alias/key/key/...]` into the JSON: a key is a dict key (it may itself
  contain `/`), a list index, or `field=value` (the list element whose field has that value);
* a leading `?` lets the cell be blank (the baseline row of a Δ column).

A number shown with d decimals must equal its expression to within half a unit of the
d-th decimal, so editing any figure, or any result file, fails this test.
"""

from __future__ import annotations

import ast
import json
import operator
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
COMMENT = re.compile(r"<!--\s*results\b(.*?)-->", re.S)
NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?")
REF = re.compile(r"\[([^\[\]]+)\]")
OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def parse_spec(body: str) -> dict:
    spec, key = {}, None
    for line in body.strip().splitlines():
        m = re.match(r"\s*(files|rows|cols):(.*)", line)
        if m:
            key = m.group(1)
            spec[key] = m.group(2).strip()
        elif key and line.strip():
            spec[key] += " " + line.strip()
    missing = {"files", "rows", "cols"} - set(spec)
    if missing:
        raise ValueError(f"results comment lacks {', '.join(sorted(missing))}")
    files = {}
    for item in spec["files"].split(","):
        alias, _, path = item.strip().partition("=")
        files[alias.strip()] = path.strip()
    sep = ";" if ";" in spec["rows"] else ","  # row keys that hold commas are separated by semicolons
    return {"files": files, "rows": [r.strip() for r in spec["rows"].split(sep)],
            "cols": [c.strip() for c in spec["cols"].split("|")]}


def tables(text: str):
    """(line number, source comment body or None, rows of cells) for each Markdown table."""
    lines = text.splitlines()
    out, i = [], 0
    while i < len(lines):
        if lines[i].lstrip().startswith("|") and i + 1 < len(lines) and re.match(r"\s*\|[\s:|-]+\|\s*$", lines[i + 1]):
            start = i
            j = i + 2
            rows = []
            while j < len(lines) and lines[j].lstrip().startswith("|"):
                rows.append(split_row(lines[j]))
                j += 1
            before = "\n".join(lines[:start]).rstrip()
            opening = before.rfind("<!--")
            m = COMMENT.fullmatch(before[opening:]) if before.endswith("-->") and opening >= 0 else None
            source = m.group(1) if m else None  # only a results comment right above the table
            out.append((start + 1, source, split_row(lines[start]), rows))
            i = j
        else:
            i += 1
    return out


def split_row(line: str) -> list[str]:
    cells = re.split(r"(?<!\\)\|", line.strip())
    return [c.strip() for c in cells[1:-1]]


def lookup(data: dict, path: str):
    alias, *keys = path.split("/")
    node = data[alias]
    while keys:
        if isinstance(node, list):
            key = keys.pop(0)
            if "=" in key:
                field, _, value = key.partition("=")
                hits = [e for e in node if str(e.get(field)) == value]
                if len(hits) != 1:
                    raise KeyError(f"{path}: {len(hits)} elements with {field}={value}")
                node = hits[0]
            else:
                node = node[int(key)]
        else:  # the longest run of segments that is a key: keys such as "bench/out/ptb-cpu"
            n = next((n for n in range(len(keys), 0, -1) if "/".join(keys[:n]) in node), None)
            if n is None:
                raise KeyError(f"{path}: no key {keys[0]!r}")
            node, keys = node["/".join(keys[:n])], keys[n:]
    if isinstance(node, bool) or not isinstance(node, (int, float)):
        raise TypeError(f"{path} is {node!r}, not a number")
    return node


def evaluate(expr: str, data: dict) -> float:
    values = {}

    def ref(m):
        name = f"_v{len(values)}"
        values[name] = lookup(data, m.group(1))
        return name

    tree = ast.parse(REF.sub(ref, expr), mode="eval")

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.BinOp) and type(node.op) in OPS:
            return OPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.Name) and node.id in values:
            return values[node.id]
        raise ValueError(f"not allowed in a results expression: {ast.dump(node)}")

    return ev(tree)


def cell_numbers(cell: str) -> list[tuple[float, int]]:
    """(value, decimals) of each number shown in a cell."""
    text = cell.replace("−", "-").replace("**", "").replace("`", "")
    out = []
    for m in NUMBER.finditer(text):
        s = m.group(0).replace(",", "")
        mant = s.lower().split("e")[0]
        decimals = len(mant.split(".")[1]) if "." in mant else 0
        exp = int(s.lower().split("e")[1]) if "e" in s.lower() else 0
        out.append((float(s), decimals - exp))
    return out


def check_table(source: str, header: list[str], rows: list[list[str]], root: Path = ROOT) -> list[str]:
    """Every mismatch between the table and its results files, as readable lines."""
    spec = parse_spec(source)
    data = {alias: json.loads((root / path).read_text()) for alias, path in spec["files"].items()}
    problems = []
    if len(spec["cols"]) != len(header):
        return [f"{len(spec['cols'])} column specs for {len(header)} columns"]
    if len(spec["rows"]) != len(rows):
        return [f"{len(spec['rows'])} row keys for {len(rows)} rows"]
    for entry, cells in zip(spec["rows"], rows):
        src, key = entry.split(":", 1) if ":" in entry else ("", entry)
        if len(cells) != len(header):
            problems.append(f"row {key}: {len(cells)} cells for {len(header)} columns")
            continue
        for col, cell, colspec in zip(header, cells, spec["cols"]):
            if colspec == "-":
                continue
            optional = colspec.startswith("?")
            exprs = [e.strip() for e in colspec.lstrip("?").replace("{row}", key).replace("{src}", src).split(";")]
            shown = cell_numbers(cell)
            if not shown and optional:
                continue
            if len(shown) != len(exprs):
                problems.append(f"row {key}, column {col!r}: {len(shown)} numbers in {cell!r}, {len(exprs)} expected")
                continue
            for (value, decimals), expr in zip(shown, exprs):
                try:
                    want = evaluate(expr, data)
                except (KeyError, IndexError, TypeError, ValueError) as e:
                    problems.append(f"row {key}, column {col!r}: {expr}: {e}")
                    continue
                tol = 0.5 * 10 ** -decimals * (1 + 1e-6) + 1e-12
                if abs(want - value) > tol:
                    problems.append(f"row {key}, column {col!r}: shows {value:g}, the results give {want:.6g} ({expr})")
    return problems


def sourced_tables():
    for doc in DOCS:
        for line, source, header, rows in tables(doc.read_text()):
            if source is not None:
                yield pytest.param(doc, line, source, header, rows, id=f"{doc.name}:{line}")


@pytest.mark.parametrize("doc, line, source, header, rows", list(sourced_tables()))
def test_table_matches_its_results_files(doc, line, source, header, rows):
    problems = check_table(source, header, rows)
    assert not problems, f"{doc.name}:{line}:\n  " + "\n  ".join(problems)


def test_every_table_in_results_md_names_its_source():
    found = tables((ROOT / "docs" / "results.md").read_text())
    assert len(found) >= 10
    unsourced = [line for line, source, _, _ in found if source is None]
    assert not unsourced, f"docs/results.md tables without a results comment at lines {unsourced}"


def test_an_edited_figure_or_result_fails(tmp_path):
    """The check sees a changed figure in the table and a changed value in the file."""
    (tmp_path / "r.json").write_text(json.dumps({"rows": [{"m": "a", "ppl": 98.2633}, {"m": "b", "ppl": 85.65}]}))
    source = """
    files: r=r.json
    rows: a, b
    cols: - | [r/rows/m={row}/ppl] | ?100 * ([r/rows/m={row}/ppl] / [r/rows/m=a/ppl] - 1)
    """
    header = ["method", "ppl", "Δ"]
    good = [["a", "98.26", ""], ["b", "**85.65**", "−12.8 %"]]
    assert check_table(source, header, good, root=tmp_path) == []
    edited = [["a", "98.26", ""], ["b", "85.66", "−12.8 %"]]
    assert len(check_table(source, header, edited, root=tmp_path)) == 1
    edited_delta = [["a", "98.26", ""], ["b", "85.65", "−12.7 %"]]
    assert len(check_table(source, header, edited_delta, root=tmp_path)) == 1
    finer = [["a", "98.264", ""], ["b", "85.650", "−12.84 %"]]  # more decimals, a tighter check: 98.2633
    assert len(check_table(source, header, finer, root=tmp_path)) == 1
    (tmp_path / "r.json").write_text(json.dumps({"rows": [{"m": "a", "ppl": 98.2633}, {"m": "b", "ppl": 84.0}]}))
    assert len(check_table(source, header, good, root=tmp_path)) == 2


def test_every_bench_path_the_docs_name_exists():
    """Scripts and results files named in README.md and docs/ are where the docs say."""
    missing = []
    for doc in DOCS:
        for path in set(re.findall(r"bench/[\w./+-]*\w", doc.read_text())):
            # bench/out/ holds a user's own outputs; PATTERN-like names stand for a family of files
            if path == "bench/out" or path.startswith("bench/out/") or re.search(r"[A-Z]{3,}", path):
                continue
            if not (ROOT / path).exists():
                missing.append(f"{doc.name}: {path}")
    assert not missing, "\n".join(sorted(missing))
