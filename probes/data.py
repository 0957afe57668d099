"""User-facing probe training data: JSONL in, validated `Example`s out.

One JSON object per line, either

    {"text": "How do I bake bread?", "label": 0, "id": "b1"}
    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}],
     "label": 1}

`label` is 0/1 (or true/false) and is required when the file is used for training
(`labelled=True`). Optional string keys: `id` (ints are accepted and turned into strings),
`source`, `group` (examples sharing a group always land on the same side of a split) and
`score_suffix` (only the tokens of this final substring of the input are scored; the text, or
the last message's content, must end with it). Other keys are ignored. Blank lines are skipped.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROLES = ("system", "user", "assistant")

# Characters that str.splitlines() treats as line breaks; escaped on write so that any
# line-based reader sees one record per line.
_LINE_BREAKS = {"\u0085": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"}


class DataError(ValueError):
    """A problem with user-supplied data; the message says where and how to fix it."""


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True)
class Example:
    """One input: plain `text` or a chat `messages` tuple (exactly one of the two)."""

    text: str | None = None
    messages: tuple[Message, ...] | None = None
    label: int | None = None
    id: str | None = None
    source: str = ""
    group: str = ""
    score_suffix: str | None = None

    def __post_init__(self) -> None:
        if (self.text is None) == (self.messages is None):
            raise ValueError("an Example needs exactly one of `text` or `messages`")
        if self.messages is not None and not isinstance(self.messages, tuple):
            object.__setattr__(self, "messages", tuple(self.messages))
        if self.label is not None and self.label not in (0, 1):
            raise ValueError(f"label must be 0 or 1, got {self.label!r}")
        if self.score_suffix is not None and not self.final_content.endswith(self.score_suffix):
            raise ValueError("score_suffix must be a final substring of the text / last message")

    @property
    def final_content(self) -> str:
        """The text, or the content of the last message (where `score_suffix` must sit)."""
        if self.text is not None:
            return self.text
        assert self.messages is not None
        return self.messages[-1].content if self.messages else ""

    @property
    def turns(self) -> tuple[Message, ...]:
        """The input as chat turns: `messages`, or `text` as one user turn."""
        return self.messages if self.messages is not None else (Message("user", self.text),)

    @property
    def content_key(self) -> str:
        """A readable flattening of the input (for de-duplication and leak checks)."""
        if self.text is not None:
            return self.text
        assert self.messages is not None
        return "\n".join(f"{m.role}: {m.content}" for m in self.messages)

    @property
    def scoring_key(self) -> tuple:
        """What the model sees and scores: examples with equal keys get equal scores."""
        return (self.text, self.messages, self.score_suffix)

    def to_dict(self) -> dict[str, Any]:
        """The JSONL form (inverse of what `read_jsonl` accepts); empty optional keys dropped."""
        d: dict[str, Any] = {}
        if self.text is not None:
            d["text"] = self.text
        else:
            assert self.messages is not None
            d["messages"] = [{"role": m.role, "content": m.content} for m in self.messages]
        if self.label is not None:
            d["label"] = self.label
        if self.id is not None:
            d["id"] = self.id
        if self.source:
            d["source"] = self.source
        if self.group:
            d["group"] = self.group
        if self.score_suffix is not None:
            d["score_suffix"] = self.score_suffix
        return d


def _fail(path: Path, lineno: int, msg: str) -> DataError:
    return DataError(f"{path}:{lineno}: {msg}")


def _parse_label(obj: Mapping[str, Any], path: Path, lineno: int, labelled: bool) -> int | None:
    if "label" not in obj or obj["label"] is None:
        if labelled:
            raise _fail(
                path,
                lineno,
                'missing "label"; training data needs "label": 0 (benign/honest) or 1 '
                "(harmful/deceptive) on every line",
            )
        return None
    lab = obj["label"]
    if isinstance(lab, bool):
        return int(lab)
    if isinstance(lab, int) and lab in (0, 1):
        return lab
    raise _fail(path, lineno, f'"label" must be 0 or 1 (or true/false), got {lab!r}')


def _parse_messages(raw: Any, path: Path, lineno: int) -> tuple[Message, ...]:
    if not isinstance(raw, list) or not raw:
        raise _fail(path, lineno, '"messages" must be a non-empty list of {"role", "content"}')
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise _fail(path, lineno, f'messages[{i}] must be an object {{"role", "content"}}')
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise _fail(
                path, lineno, f"messages[{i}].role is {role!r}; use one of {', '.join(ROLES)}"
            )
        if not isinstance(content, str):
            raise _fail(path, lineno, f"messages[{i}].content must be a string")
        out.append(Message(role=role, content=content))
    if not any(m.content.strip() for m in out):
        raise _fail(path, lineno, "all message contents are empty")
    return tuple(out)


def _opt_str(obj: Mapping[str, Any], key: str, path: Path, lineno: int) -> str | None:
    v = obj.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (str, int)):
        raise _fail(path, lineno, f'"{key}" must be a string, got {type(v).__name__}')
    if key != "id" and not isinstance(v, str):
        raise _fail(path, lineno, f'"{key}" must be a string, got {type(v).__name__}')
    return str(v)


def parse_example(
    obj: Any, path: Path | str = "<data>", lineno: int = 0, *, labelled: bool = False
) -> Example:
    """Validate one decoded JSON object; errors are `DataError`s naming path and line."""
    path = Path(path)
    if not isinstance(obj, dict):
        raise _fail(path, lineno, f"each line must be a JSON object, got {type(obj).__name__}")
    has_text, has_msgs = "text" in obj, "messages" in obj
    if has_text and has_msgs:
        raise _fail(path, lineno, 'give either "text" or "messages", not both')
    if not has_text and not has_msgs:
        raise _fail(path, lineno, 'missing input: add "text": "..." or "messages": [...]')
    text = messages = None
    if has_text:
        text = obj["text"]
        if not isinstance(text, str):
            raise _fail(path, lineno, f'"text" must be a string, got {type(text).__name__}')
        if not text.strip():
            raise _fail(path, lineno, '"text" is empty')
    else:
        messages = _parse_messages(obj["messages"], path, lineno)
    label = _parse_label(obj, path, lineno, labelled)
    suffix = _opt_str(obj, "score_suffix", path, lineno)
    final = text if text is not None else messages[-1].content  # type: ignore[index]
    if suffix is not None and (not suffix or not final.endswith(suffix)):
        raise _fail(
            path,
            lineno,
            '"score_suffix" must be a non-empty final substring of "text" '
            "(or of the last message's content)",
        )
    return Example(
        text=text,
        messages=messages,
        label=label,
        id=_opt_str(obj, "id", path, lineno),
        source=_opt_str(obj, "source", path, lineno) or "",
        group=_opt_str(obj, "group", path, lineno) or "",
        score_suffix=suffix,
    )


def read_jsonl(path: str | Path, *, labelled: bool) -> list[Example]:
    """Read and validate a JSONL file of examples (see the module docstring for the format)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    out: list[Example] = []
    with path.open(encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise _fail(
                    path,
                    lineno,
                    f"not valid JSON ({e.msg} at column {e.colno}); "
                    "each line must hold one complete JSON object",
                ) from None
            out.append(parse_example(obj, path, lineno, labelled=labelled))
    if not out:
        raise DataError(f"{path}: file is empty (expected one JSON object per line)")
    return out


def write_jsonl(path: str | Path, rows: Iterable[Mapping[str, Any] | Example]) -> None:
    """Write rows (dicts or `Example`s) one JSON object per line, UTF-8."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            d = row.to_dict() if isinstance(row, Example) else dict(row)
            line = json.dumps(d, ensure_ascii=False)
            for ch, esc in _LINE_BREAKS.items():
                line = line.replace(ch, esc)
            f.write(line + "\n")


def _example_digest(ex: Example) -> str:
    d = {
        "text": ex.text,
        "messages": None if ex.messages is None else [[m.role, m.content] for m in ex.messages],
        "label": ex.label,
        "score_suffix": ex.score_suffix,
    }
    blob = json.dumps(d, ensure_ascii=True, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def data_sha256(examples: Iterable[Example]) -> str:
    """Stable hash of the examples' inputs, labels and score suffixes (not ids/sources/groups).

    Order-independent (a multiset hash: per-example digests are sorted), so shuffling the
    same data gives the same provenance hash; duplicates still count.
    """
    digests = sorted(_example_digest(ex) for ex in examples)
    h = hashlib.sha256()
    h.update(f"latentwatch-data-v1:{len(digests)}\n".encode())
    for d in digests:
        h.update(d.encode("ascii"))
    return h.hexdigest()
