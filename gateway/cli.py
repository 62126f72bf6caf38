"""The `blendgate` command."""

from __future__ import annotations

import json
import logging
import sys
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional

import typer

from . import __version__
from .config import ConfigError, Settings, load_settings

if TYPE_CHECKING:
    from rich.console import Console

    from ..retriever.embedder import Embedder
    from ..semcache.settings import SemanticCacheSettings
    from ..semcache.tuning import LabelledPair

app = typer.Typer(help="blendgate: an OpenAI-compatible RAG gateway with semantic and KV caching.",
                  no_args_is_help=True, add_completion=False)

ConfigOption = typer.Option(None, "--config", "-c", help="YAML configuration file (see README).",
                            exists=False, dir_okay=False)


@contextmanager
def _errors_exit(*errors: type[Exception], code: int) -> Iterator[None]:
    """One of these errors ends the command with its message and this exit code, not a traceback."""
    try:
        yield
    except errors as exc:
        typer.echo(f"blendgate: {exc}", err=True)
        raise typer.Exit(code=code) from None


def _settings_or_exit(config: Optional[Path], **overrides: object) -> Settings:
    with _errors_exit(ConfigError, code=2):
        return load_settings(config, **overrides)


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # Third-party chatter that says nothing an operator needs.
    # faiss.loader logs each CPU-specific build it tries and lacks (avx512, avx2) as an INFO-level
    # ModuleNotFoundError before loading the generic one, which reads like a failure.
    for noisy in ("LiteLLM", "litellm", "httpx", "transformers", "faiss.loader"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@app.command()
def serve(
    config: Optional[Path] = ConfigOption,
    # Defaults in parentheses: rich reads "[default: ...]" in a help text as markup and drops it.
    host: Optional[str] = typer.Option(None, help="Address to listen on (default: the configuration's host, "
                                                  "else 127.0.0.1)."),
    port: Optional[int] = typer.Option(None, help="Port to listen on (default: the configuration's port, "
                                                  "else 8000)."),
    log_level: Optional[str] = typer.Option(None, help="debug, info, warning or error (default: the "
                                                       "configuration's log_level, else info)."),
) -> None:
    """Run the gateway. With no configuration it serves the embedded SmolLM2-135M-Instruct on the CPU."""
    settings = _settings_or_exit(config, host=host, port=port, log_level=log_level)
    _configure_logging(settings.log_level)
    import uvicorn

    from .app import create_app
    from .lifecycle import Lifecycle
    from .server import DrainingServer

    logging.getLogger("blendgate.gateway").info(
        "blendgate %s on http://%s:%d serving %s", __version__, settings.host, settings.port,
        ", ".join(m.name for m in settings.models))
    failed = False

    def stop() -> None:  # something the gateway cannot serve without failed to load (logged where it failed)
        nonlocal failed
        failed = server.should_exit = True

    lifecycle = Lifecycle()
    server = DrainingServer(uvicorn.Config(
        create_app(settings, on_fatal=stop, lifecycle=lifecycle), host=settings.host, port=settings.port,
        log_level=settings.log_level, log_config=None, timeout_graceful_shutdown=settings.shutdown.grace_s),
        lifecycle, settings.shutdown.drain_delay_s)
    server.run()
    if failed or not server.started:
        raise typer.Exit(code=1)


def _quiet() -> None:
    """Command-line tools show their own progress; silence the libraries' loading bars and chatter."""
    _configure_logging("warning")
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()


def _retriever_or_exit(settings: Settings):
    from ..retriever.service import CorruptIndexError
    from .rag import build_retriever

    _quiet()
    with _errors_exit(CorruptIndexError, OSError, ValueError, code=1):
        return build_retriever(settings)


def _retrieval_errors_exit() -> AbstractContextManager[None]:
    """A refused retrieval operation ends the command with its message and exit code 1."""
    from ..retriever.service import RetrievalError

    return _errors_exit(RetrievalError, code=1)


class _RichProgress:
    """Draws the retriever's progress phases as rich progress bars."""

    def __init__(self, progress) -> None:
        self.progress = progress
        self.tasks: dict[str, object] = {}

    def start(self, phase: str, total: int) -> None:
        self.tasks[phase] = self.progress.add_task(phase.capitalize(), total=total)

    def advance(self, phase: str, amount: int = 1) -> None:
        self.progress.advance(self.tasks[phase], amount)


@app.command()
def ingest(
    paths: list[Path] = typer.Argument(..., help="Files and folders (txt, md, html, pdf, jsonl, SQuAD json)."),
    collection: str = typer.Option(..., "--collection", help="Collection to add to (created if new)."),
    config: Optional[Path] = ConfigOption,
) -> None:
    """Add documents to a collection. Unchanged files are skipped; changed files replace their chunks."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    settings = _settings_or_exit(config)
    retriever = _retriever_or_exit(settings)
    console = Console(stderr=True)
    columns = (TextColumn("{task.description:<10}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with _retrieval_errors_exit(), Progress(*columns, console=console) as progress:
        summary = retriever.ingest_paths(paths, collection, _RichProgress(progress))
    console.print(f"[bold]{collection}[/]: {summary.files} files ingested, {summary.unchanged} unchanged, "
                  f"{summary.chunks} chunks added, {summary.removed_chunks} replaced, in {summary.seconds:.1f} s")
    for path, reason in summary.skipped:
        console.print(f"  [yellow]skipped[/] {path}: {reason}")


@app.command()
def collections(config: Optional[Path] = ConfigOption) -> None:
    """List the collections with their sizes."""
    from rich.console import Console
    from rich.table import Table

    retriever = _retriever_or_exit(_settings_or_exit(config))
    table = Table("collection", "files", "chunks", "version", "embedder")
    for info in retriever.collections():
        table.add_row(info["name"], str(info["files"]), str(info["chunks"]), str(info["version"]), info["embedder"])
    Console().print(table)


@app.command()
def delete(
    collection: str = typer.Option(..., "--collection", help="Collection to delete from."),
    source: Optional[str] = typer.Option(None, "--source", help="Only this file (as ingested); else everything."),
    config: Optional[Path] = ConfigOption,
) -> None:
    """Delete a collection, or one source file's chunks from it."""
    retriever = _retriever_or_exit(_settings_or_exit(config))
    with _retrieval_errors_exit():
        removed = retriever.delete(collection, source)
    typer.echo(f"deleted {removed} chunks from {collection}" + (f" ({source})" if source else " (whole collection)"))


@app.command()
def reindex(
    collection: str = typer.Option(..., "--collection", help="Collection whose index to rebuild."),
    config: Optional[Path] = ConfigOption,
) -> None:
    """Rebuild a collection's FAISS index from its stored chunks (e.g. after the index file was damaged)."""
    retriever = _retriever_or_exit(_settings_or_exit(config))
    with _retrieval_errors_exit():
        size = retriever.reindex(collection)
    typer.echo(f"rebuilt the index of {collection}: {size} chunks")


@app.command("tune-thresholds")
def tune_thresholds(
    pairs_file: Path = typer.Argument(..., help='JSON lines: {"cached": "...", "query": "...", "same_answer": true}.',
                                      dir_okay=False),
    false_hits: float = typer.Option(0.02, "--false-hits", min=0.0, max=0.5,
                                     help="Largest share of a category's hits that may be false."),
    # With fewer pairs than this, one false pair swings a category's suggestion.
    min_pairs: int = typer.Option(30, "--min-pairs", min=1,
                                  help="Fewest labelled pairs a category needs for a suggestion."),
    verifier_out: Optional[Path] = typer.Option(
        None, "--verifier-out", dir_okay=False,
        help="Also train the semantic cache's verifier on these pairs (and rephrasings of their cached "
             "questions, labelled same answer; word rarity from the default verifier's) and write its weights "
             "here (then set semantic_cache.verifier_path to it)."),
    config: Optional[Path] = ConfigOption,
) -> None:
    """Suggest each semantic-cache category's threshold from labelled question pairs of your own traffic, and
    with --verifier-out train the verifier of candidate hits on them."""
    from rich.console import Console
    from rich.table import Column, Table

    from ..retriever.embedder import Embedder, EmbedderError
    from ..semcache.tuning import PairsFileError, read_pairs, suggest_thresholds

    settings = _settings_or_exit(config)
    with _errors_exit(PairsFileError, code=2):
        pairs = read_pairs(pairs_file)
    if verifier_out is not None:  # refused before the embedder loads (seconds) when the labels are too few
        from ..semcache.verifier_training import check_label_counts

        with _errors_exit(ValueError, code=2):
            check_label_counts(pairs)
    _quiet()
    with _errors_exit(EmbedderError, code=1):
        embedder = Embedder(settings.retrieval.embedder_path)
    results = suggest_thresholds(settings.semantic_cache, embedder.embed, pairs, false_hits, min_pairs)
    console = Console(stderr=True)
    title = f"{len(pairs)} labelled pairs, {embedder.name}, false hits at most {false_hits:.1%} of hits"
    table = Table(Column("category", no_wrap=True), "pairs", "same", "configured", "suggested", "hits", "false",
                  "served", title=title,
                  caption="same: pairs labelled same_answer; served: share of those at or above the suggestion")
    for r in results:
        configured = "never" if r.configured is None else f"{r.configured:.4f}"
        if r.suggested is None:
            table.add_row(r.category, str(r.pairs), str(r.same), configured, "-", "", "", "")
        else:
            table.add_row(r.category, str(r.pairs), str(r.same), configured, f"{r.suggested:.4f}", str(r.hits),
                          str(r.false_hits), f"{r.recall:.0%}")
    console.print(table)
    for r in results:
        if r.suggested is None and r.configured is not None:
            console.print(f"[yellow]{r.category}[/]: {r.reason}")
    if verifier_out is not None:
        _train_verifier(settings.semantic_cache, embedder, pairs, pairs_file, verifier_out, console)
    # The suggestions alone on stdout, to paste under semantic_cache.categories or to pipe on.
    typer.echo(json.dumps({r.category: round(r.suggested, 4) for r in results if r.suggested is not None}))


def _train_verifier(settings: SemanticCacheSettings, embedder: Embedder, pairs: list[LabelledPair], pairs_file: Path,
                    out: Path, console: Console) -> None:
    """Train the verifier on the operator's pairs, write its weights to `out` and show its calibration per
    category at the configured thresholds and false-hit bounds."""
    from rich.table import Column, Table

    from ..semcache.verifier import DEFAULT_VERIFIER_FILE, Verifier, VerifierModel
    from ..semcache.verifier_training import train_from_embeddings

    # A few hundred pairs are too few for document frequencies: the words' rarity stays the default's (QQP's).
    rarity = VerifierModel.load(DEFAULT_VERIFIER_FILE).rarity
    with _errors_exit(ValueError, OSError, code=2):
        model = train_from_embeddings(pairs, embedder.embed, f"{pairs_file.name} ({len(pairs)} pairs), {embedder.name}",
                                      rarity)
        model.save(out)
    verifier = Verifier(model, settings.categories)
    table = Table(Column("category", no_wrap=True), "bound", "probability", "false share", "95% upper", "served",
                  "served unverified", title=f"verifier written to {out}",
                  caption="shares of the pairs at or above each category's threshold; served: of those labelled "
                          "same_answer")
    for c in verifier.calibrations.values():
        table.add_row(c.category, f"{c.bound:.1%}", "-" if c.probability is None else f"{c.probability:.2f}",
                      f"{c.estimate:.1%}", f"{c.upper:.1%}", f"{c.hit_rate:.0%}", f"{c.unverified_hit_rate:.0%}")
    console.print(table)


@app.command("check-config")
def check_config(config: Optional[Path] = ConfigOption) -> None:
    """Validate a configuration and print it as the gateway would use it (keys and passwords hidden)."""
    typer.echo(json.dumps(_settings_or_exit(config).redacted(), indent=2))


@app.command()
def version() -> None:
    """Print blendgate's version."""
    typer.echo(__version__)


def main() -> None:
    app()
