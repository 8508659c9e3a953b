"""Class labels from a table, for `prepare --labels` and the folder source's `data.labels`.

A table maps an image's file name (or its relative path, when the table's names contain '/') to a value of the
chosen column; the classes are the distinct values of the labelled images, sorted (numbers by value). Two
formats, told apart by the first line:

    CSV or TSV with a header row, the first column the file name:
        image,category
        1f600.png,Smileys & Emotion
    CelebA's list_attr_celeba.txt (and list_landmarks_*.txt) as shipped: the row count, the column names (one
    fewer than the fields: the file name column has none), then rows separated by runs of spaces:
        202599
        5_o_Clock_Shadow Arched_Eyebrows ... Young
        000001.jpg -1  1  1 -1 ...
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from distgan.config import ConfigError

UNLABELLED = ("refuse", "skip")  # images the table does not name: stop, or leave them out
UNMATCHED = ("refuse", "ignore")  # table names that match no image: stop, or only count them


@dataclass
class LabelTable:
    """The chosen column of a label table: name (file name or relative path) -> value."""

    path: str
    column: str
    values: dict[str, str]

    @property
    def by_path(self) -> bool:
        """Whether the table names relative paths (some name holds a '/') rather than file names."""
        return any("/" in name for name in self.values)

    def key(self, relative: str) -> str:
        """The table name an image at this relative path goes by."""
        return relative if self.by_path else PurePosixPath(relative).name


def sort_classes(values: set[str] | list[str]) -> list[str]:
    """Distinct values sorted: by number when all are numbers (-1 before 1, 2 before 10), else naturally
    (digit runs compared as numbers: class2 before class10)."""

    def number(text: str) -> float | None:
        try:
            return float(text)
        except ValueError:
            return None

    distinct = set(values)
    if all(number(v) is not None for v in distinct):
        return sorted(distinct, key=lambda v: (number(v), v))
    return sorted(distinct, key=lambda v: ([int(p) if p.isdigit() else p for p in re.split(r"(\d+)", v)], v))


def _rows(text: str, path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """The column names (the first one names the file column) and the (line number, fields) of each row."""
    lines = text.splitlines()
    first = lines[0].strip() if lines else ""
    if first.isdigit():  # CelebA: count, names, rows separated by runs of spaces
        if len(lines) < 2:
            raise ConfigError(f"label table {path}: a CelebA-style table needs a line of column names after the count")
        header = lines[1].split()
        rows = [(i + 3, line.split()) for i, line in enumerate(lines[2:]) if line.strip()]
        if rows and len(header) == len(rows[0][1]) - 1:
            header = ["file", *header]  # the file name column has no name
        if len(rows) != int(first):
            raise ConfigError(f"label table {path}: its first line says {int(first)} rows but it holds {len(rows)}")
    else:
        delimiter = "\t" if path.suffix.lower() in (".tsv", ".tab") or ("\t" in first and "," not in first) else ","
        table = [row for row in csv.reader(io.StringIO(text), delimiter=delimiter)]
        header = [cell.strip() for cell in table[0]] if table else []
        rows = [(i + 2, [cell.strip() for cell in row]) for i, row in enumerate(table[1:]) if any(row)]
    if len(header) < 2:
        raise ConfigError(f"label table {path}: needs a header row naming a file column and at least one more column")
    for line, fields in rows:
        if len(fields) != len(header):
            raise ConfigError(
                f"label table {path}: line {line} has {len(fields)} fields where the header names {len(header)}"
            )
    return header, rows


def read_table(path: str | Path, column: str, option: str = "--") -> LabelTable:
    """The chosen column of a label table. `column` empty: the table's only column besides the file name.

    option: how the settings are spelled in messages ("--" for prepare's flags, "data." for config keys)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: a byte-order mark is not part of the first name
    except FileNotFoundError:
        raise ConfigError(f"{option}labels {path}: no such file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{option}labels {path}: not a text table (it is not UTF-8)") from None
    except OSError as e:
        raise ConfigError(f"{option}labels {path}: cannot read it: {e.strerror or e}") from None
    header, rows = _rows(text, path)
    if not column:
        if len(header) != 2:
            raise ConfigError(
                f"label table {path} has {len(header) - 1} label columns: choose one with {option}label_column "
                f"({_listed(header[1:])})"
            )
        column = header[1]
    if column not in header[1:]:
        raise ConfigError(
            f"{option}label_column {column!r} is not a column of {path}; its columns: {_listed(header[1:])}"
        )
    index = header.index(column)
    values: dict[str, str] = {}
    for line, fields in rows:
        name, value = fields[0], fields[index]
        if not name or not value:
            raise ConfigError(f"label table {path}: line {line} has no {'file name' if not name else column}")
        if values.setdefault(name, value) != value:
            raise ConfigError(
                f"label table {path}: {name} is labelled twice in column {column}, {values[name]!r} and {value!r}"
            )
    if not values:
        raise ConfigError(f"label table {path} holds no rows")
    return LabelTable(str(path), column, values)


def _example(names: list[str]) -> str:
    return f" (e.g. {names[0]})" if names else ""


def _listed(names: list[str], most: int = 50) -> str:
    return ", ".join(names[:most]) + (f", ... ({len(names)} in all)" if len(names) > most else "")


@dataclass
class Labelling:
    """What a table gave a list of images: the class index of each (None: not named, to be left out), the class
    names, and the counts of images it does not name and of its names that match no image."""

    labels: list[int | None]
    classes: list[str]
    unlabelled: list[str]  # relative paths of the images the table does not name
    unmatched: list[str]  # table names that match no image

    def summary(self, table: LabelTable) -> dict:
        """The manifest's record of the labelling."""
        return {
            "table": str(Path(table.path).resolve()),
            "column": table.column,
            "by": "relative path" if table.by_path else "file name",
            "num_unlabelled": len(self.unlabelled),
            "num_unmatched": len(self.unmatched),
            "unmatched_examples": self.unmatched[:10],
        }


def label(
    table: LabelTable, relative: list[str], unlabelled: str = "refuse", unmatched: str = "refuse", option: str = "--"
) -> Labelling:
    """Label the images at these relative paths from the table; a ConfigError (one line: both counts and an
    example of each) when images it does not name are not to be skipped, or names that match no image are not to
    be ignored. One name matching several images (the same file name in several sources) labels them all."""
    for key, value, choices in (("unlabelled", unlabelled, UNLABELLED), ("unmatched", unmatched, UNMATCHED)):
        if value not in choices:
            raise ConfigError(f"{option}{key} must be one of {', '.join(choices)}; got {value!r}")
    keys = [table.key(r) for r in relative]
    found = set(keys)
    missing = [r for r, k in zip(relative, keys) if k not in table.values]
    unused = sorted(name for name in table.values if name not in found)
    refuse = (missing and unlabelled == "refuse") or (unused and unmatched == "refuse")
    if refuse or len(missing) == len(relative):
        parts = [
            f"{len(missing)} of {len(relative)} images are not in it{_example(missing)}",
            f"{len(unused)} of its {len(table.values)} names match no image{_example(unused)}",
        ]
        advice = []
        if missing and unlabelled == "refuse":
            advice.append(f"{option}unlabelled=skip leaves such images out")
        if unused and unmatched == "refuse":
            advice.append(f"{option}unmatched=ignore accepts such names")
        if len(missing) == len(relative):
            advice = [f"it names {'relative paths' if table.by_path else 'file names'}: check it is the right table"]
        raise ConfigError(f"label table {table.path}: {'; '.join(parts)}; {'; '.join(advice)}")
    classes = sort_classes({table.values[k] for k in keys if k in table.values})
    index = {name: i for i, name in enumerate(classes)}
    labels = [index[table.values[k]] if k in table.values else None for k in keys]
    return Labelling(labels, classes, missing, unused)
