"""Reading files into documents: plain text, Markdown, HTML, PDF, JSONL and SQuAD-style JSON.

A file that cannot be used (unreadable, empty, binary, too large, malformed) is reported with a reason
and skipped; it never stops the rest of an ingest.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

TEXT_SUFFIXES = {".txt", ".text", ".md", ".markdown", ".rst"}
HTML_SUFFIXES = {".html", ".htm", ".xhtml"}
SUPPORTED_SUFFIXES = TEXT_SUFFIXES | HTML_SUFFIXES | {".pdf", ".jsonl", ".json"}


@dataclass(frozen=True)
class SourceDocument:
    """One document of a file: a whole text file, one JSONL line, one SQuAD paragraph."""

    source: str  # the file's path, plus "#fragment" for documents inside it
    text: str


@dataclass
class LoadedFile:
    path: Path
    content_hash: str
    documents: list[SourceDocument] = field(default_factory=list)


@dataclass(frozen=True)
class SkippedFile:
    path: Path
    reason: str


class _Skip(Exception):
    pass


def discover(paths: Iterable[Path]) -> Iterator[Path | SkippedFile]:
    """Files under the given paths, folders walked recursively in sorted order; hidden files left out."""
    for path in paths:
        if not path.exists():
            yield SkippedFile(path, "no such file or folder")
        elif path.is_dir():
            for child in sorted(path.rglob("*")):
                if child.is_file() and not any(part.startswith(".") for part in child.relative_to(path).parts):
                    yield child
        else:
            yield path


def _read_text(raw: bytes) -> str:
    if b"\x00" in raw[:8192]:
        raise _Skip("binary content")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _Skip("not UTF-8 text") from None


def _html_text(raw: bytes) -> str:
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(_read_text(raw), "html.parser")
    for tag in soup(["script", "style", "noscript", "template"]):
        tag.decompose()
    # Block elements become paragraph breaks so the chunker can split on them.
    return "\n\n".join(line.strip() for line in soup.get_text("\n").split("\n") if line.strip())


def _pdf_text(path: Path) -> str:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(str(path))
        return "\n\n".join((page.extract_text() or "").strip() for page in reader.pages)
    except (PdfReadError, ValueError, KeyError, TypeError) as exc:
        raise _Skip(f"unreadable PDF: {exc}") from exc


def _jsonl_documents(path: Path, raw: bytes, text_field: str) -> list[SourceDocument]:
    documents = []
    for number, line in enumerate(_read_text(raw).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise _Skip(f"line {number} is not JSON: {exc.msg}") from None
        text = record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise _Skip(f"line {number} has no string field '{text_field}'")
        if text.strip():
            documents.append(SourceDocument(f"{path}#{record.get('id', number)}", text))
    return documents


def _json_documents(path: Path, raw: bytes, text_field: str) -> list[SourceDocument]:
    try:
        data = json.loads(_read_text(raw))
    except json.JSONDecodeError as exc:
        raise _Skip(f"not valid JSON: {exc.msg}") from None
    # SQuAD format (XQuAD and friends): each paragraph's context is a document.
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        documents = []
        for article in data["data"]:
            title = str(article.get("title", "untitled"))
            for index, paragraph in enumerate(article.get("paragraphs", [])):
                context = paragraph.get("context")
                if isinstance(context, str) and context.strip():
                    documents.append(SourceDocument(f"{path}#{title}/{index}", context))
        return documents
    if isinstance(data, list) and all(isinstance(item, dict) for item in data):
        return [SourceDocument(f"{path}#{item.get('id', index)}", item[text_field])
                for index, item in enumerate(data, start=1)
                if isinstance(item.get(text_field), str) and item[text_field].strip()]
    raise _Skip(f"JSON is neither SQuAD format nor a list of objects with a '{text_field}' field")


def load_file(path: Path, *, max_bytes: int, text_field: str = "text") -> LoadedFile | SkippedFile:
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        return SkippedFile(path, f"unsupported file type '{suffix or path.name}'")
    try:
        size = path.stat().st_size
        if size > max_bytes:
            return SkippedFile(path, f"larger than the {max_bytes // (1024 * 1024)} MiB limit ({size} bytes)")
        raw = path.read_bytes()
    except OSError as exc:
        return SkippedFile(path, f"unreadable: {exc.strerror or exc}")
    loaded = LoadedFile(path, hashlib.sha256(raw).hexdigest())
    try:
        if suffix in TEXT_SUFFIXES:
            loaded.documents = [SourceDocument(str(path), _read_text(raw))]
        elif suffix in HTML_SUFFIXES:
            loaded.documents = [SourceDocument(str(path), _html_text(raw))]
        elif suffix == ".pdf":
            if not raw.startswith(b"%PDF"):
                raise _Skip("not a PDF file")
            loaded.documents = [SourceDocument(str(path), _pdf_text(path))]
        elif suffix == ".jsonl":
            loaded.documents = _jsonl_documents(path, raw, text_field)
        else:
            loaded.documents = _json_documents(path, raw, text_field)
    except _Skip as skip:
        return SkippedFile(path, str(skip))
    loaded.documents = [d for d in loaded.documents if d.text.strip()]
    if not loaded.documents:
        return SkippedFile(path, "no text in it")
    return loaded
