"""``megaray prepare text | bin | sft | audio | audio-latents | images | image-latents``: sources -> shards + manifest.json.

Everything a command can check cheaply (options, source paths, the output folder through
:func:`megaray.fs.check_target`, the VAE's ``n_mels`` against the shards') is checked before Ray starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import typer

from megaray.cli.app import prepare_app, setup_logging
from megaray.cli.options import at_least, in_interval, input_file, one_of, require_local_sources
from megaray.cli.output import JSON_OPTION, emit, json_stdout

_POSITIVE = at_least(1)
_OVERWRITE_HELP = "replace a non-empty --out folder"
#: the remedy a refused --out names (megaray.fs.check_target)
_OVERWRITE_HOW = "pass --overwrite"
_HF_HELP = (
    "; hf:NAME[:CONFIG][@SPLIT] = a Hugging Face Hub dataset (streamed), hf:./PATH[@SPLIT] = one built "
    "locally (save_to_disk folder, parquet folder/glob)"
)


@prepare_app.callback(invoke_without_command=True)
def prepare_callback(
    ctx: typer.Context,
    list_sources: bool = typer.Option(False, "--list", help="print the sources each prepare command reads and exit"),
) -> None:
    """Turn raw sources into training shards plus a manifest.json.

    Example: megaray prepare text --source stdlib --out data/stdlib-512 --vocab-size 512
    """
    if list_sources:
        from megaray.data.catalog import format_sources

        typer.echo(format_sources())
        raise typer.Exit(0)
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())
        raise typer.Exit(0)


@prepare_app.command("text")
def prepare_text_cmd(
    source: List[str] = typer.Option(
        ["stdlib"],
        "--source",
        "-s",
        help="folder, glob, file or s3:// gs:// URI of .txt .md .jsonl .parquet; "
        "'stdlib' = the embedded corpus of Python stdlib docstrings" + _HF_HELP,
    ),
    text_column: Optional[str] = typer.Option(
        None,
        help="hf: sources: the column holding the text (default: text/content/document, or the only string column)",
    ),
    out: str = typer.Option(
        "data/stdlib", "--out", "-o", help="output directory (shards + manifest.json + tokenizer.json)"
    ),
    vocab_size: int = typer.Option(8192, callback=_POSITIVE, help="vocabulary size when training a tokenizer"),
    tokenizer_kind: str = typer.Option(
        "bpe",
        callback=one_of(("bpe", "unigram")),
        help="tokenizer to train: bpe (byte-level BPE) | unigram (SentencePiece-style)",
    ),
    tokenizer: Optional[str] = typer.Option(
        None, callback=input_file, help="use this tokenizer.json instead of training one"
    ),
    val_fraction: float = typer.Option(
        0.02,
        callback=in_interval(0, 1, low_open=True, high_open=True),
        help="fraction of documents held out for validation (above 0: a text run validates on it)",
    ),
    min_words: int = typer.Option(
        0, callback=at_least(0), help="drop documents with fewer whitespace-separated words (0 = off; Gopher uses 50)"
    ),
    max_words: int = typer.Option(
        0, callback=at_least(0), help="drop documents with more words (0 = no limit; Gopher uses 100000)"
    ),
    max_dup_line_fraction: float = typer.Option(
        0.5,
        "--max-dup-lines",
        callback=in_interval(0, 1, low_open=True, high_open=False),
        help="drop documents whose fraction of repeated lines is above this (1 = off; Gopher uses 0.3, which "
        "also drops doctest-heavy docstrings)",
    ),
    max_top_2gram_fraction: float = typer.Option(
        1.0,
        "--max-top-2gram",
        callback=in_interval(0, 1, low_open=True, high_open=False),
        help="drop documents whose most frequent repeated word 2-gram covers more than this fraction of the "
        "characters (1 = off; Gopher uses 0.2)",
    ),
    near_dedupe: bool = typer.Option(
        True,
        help="drop MinHash near duplicates (word 5-gram shingles, 128 permutations, "
        "fixed seed) of earlier kept documents, before the split",
    ),
    dedupe_threshold: float = typer.Option(
        0.8,
        callback=in_interval(0.5, 1, low_open=False, high_open=False),
        help="estimated Jaccard similarity at or above which a document is a near duplicate",
    ),
    overwrite: bool = typer.Option(False, help=_OVERWRITE_HELP),
    as_json: bool = JSON_OPTION,
) -> None:
    """Tokenize text sources with a byte-level BPE (or unigram) and write train/val parquet shards.

    Exact duplicates, MinHash near duplicates and documents failing the length/repetition filters are
    dropped and named in the manifest's rejected entry.

    Example: megaray prepare text --source stdlib --out data/stdlib-512 --vocab-size 512
    """
    from megaray.data.text import prepare_text
    from megaray.data.text.clean import CleanConfig
    from megaray.errors import ConfigError
    from megaray.fs import check_target

    if max_words and min_words > max_words:
        raise ConfigError(
            f"--min-words ({min_words}) is above --max-words ({max_words}): every document would be dropped"
        )
    clean = CleanConfig(
        min_words=min_words,
        max_words=max_words,
        max_dup_line_fraction=max_dup_line_fraction,
        max_top_2gram_fraction=max_top_2gram_fraction,
        near_dedupe=near_dedupe,
        dedupe_threshold=dedupe_threshold,
    )
    require_local_sources(source, keywords=("stdlib",), hf=True)
    check_target(out, overwrite, how=_OVERWRITE_HOW)
    setup_logging()
    with json_stdout(as_json):
        manifest = prepare_text(
            source,
            out,
            vocab_size=vocab_size,
            tokenizer=tokenizer,
            val_fraction=val_fraction,
            overwrite=overwrite,
            tokenizer_kind=tokenizer_kind,
            text_column=text_column,
            clean=clean,
        )
    _emit_manifest(manifest, out, as_json, drop=("rejected_examples",))


@prepare_app.command("bin")
def prepare_bin_cmd(
    source: str = typer.Option(
        ..., "--source", "-s", help="local folder holding nanoGPT's train.bin and val.bin (flat token-id arrays)"
    ),
    tokenizer: str = typer.Option(
        ...,
        callback=input_file,
        help="the tokenizer.json the ids were encoded with (needs <|endoftext|>; every id "
        "must be below its vocabulary size: GPT-2's .bin files need its 50257 tokens)",
    ),
    out: str = typer.Option(..., "--out", "-o", help="output directory (text shards + manifest.json + tokenizer.json)"),
    dtype: str = typer.Option(
        "auto",
        callback=one_of(("auto", "uint16", "uint32")),
        help="id width of the .bin files: uint16 (nanoGPT's) | uint32 | auto (uint16 when the "
        "tokenizer has at most 65536 tokens, else uint32)",
    ),
    max_row_tokens: int = typer.Option(
        65536, callback=_POSITIVE, help="rows end at <|endoftext|>; longer documents are cut into rows this long"
    ),
    overwrite: bool = typer.Option(False, help=_OVERWRITE_HELP),
    as_json: bool = JSON_OPTION,
) -> None:
    """Import nanoGPT's train.bin / val.bin token streams as text shards (streamed in chunks, never loaded whole).

    Example: megaray prepare bin --source nanoGPT/data/openwebtext --tokenizer gpt2/tokenizer.json --out data/owt
    """
    from megaray.data.text.nanogpt import import_nanogpt_bin
    from megaray.fs import check_target

    require_local_sources([source])
    check_target(out, overwrite, how=_OVERWRITE_HOW)
    setup_logging()
    with json_stdout(as_json):
        manifest = import_nanogpt_bin(
            source, out, tokenizer, dtype=dtype, max_row_tokens=max_row_tokens, overwrite=overwrite
        )
    _emit_manifest(manifest, out, as_json)


@prepare_app.command("audio")
def prepare_audio_cmd(
    source: List[str] = typer.Option(
        ["espeak"],
        "--source",
        "-s",
        help="folder of wav/flac/ogg, a jsonl/csv manifest (path, text, speaker), "
        "or an s3:// gs:// URI; 'espeak' = build the embedded espeak-ng "
        "speech corpus first" + _HF_HELP,
    ),
    audio_column: Optional[str] = typer.Option(
        None,
        help="hf: sources: the audio column (default: an Audio column, "
        "{array, sampling_rate} structs, or bytes named audio)",
    ),
    text_column: Optional[str] = typer.Option(
        None,
        help="hf: sources: the transcript column (default: text/sentence/"
        "transcript/transcription/normalized_text, else none)",
    ),
    speaker_column: Optional[str] = typer.Option(
        None,
        help="hf: sources: the speaker column (default: speaker_id/"
        "speaker/speaker_name/client_id, else speaker 'default')",
    ),
    out: str = typer.Option("data/speech", "--out", "-o", help="output directory (parquet shards + manifest.json)"),
    sample_rate: int = typer.Option(16000, callback=_POSITIVE, help="target sample rate in Hz"),
    n_mels: int = typer.Option(80, callback=_POSITIVE, help="mel bands"),
    n_fft: int = typer.Option(1024, callback=_POSITIVE, help="FFT size in samples"),
    hop_length: int = typer.Option(256, callback=_POSITIVE, help="hop length in samples"),
    normalize: str = typer.Option("peak", callback=one_of(("peak", "loudness", "none")), help="peak | loudness | none"),
    clips: int = typer.Option(300, callback=_POSITIVE, help="clips to render for --source espeak"),
    overwrite: bool = typer.Option(False, help=_OVERWRITE_HELP),
    as_json: bool = JSON_OPTION,
) -> None:
    """Decode, resample, normalise and log-mel audio in Ray Data; write train/val shards.

    Corrupt, truncated, empty or silent files are skipped and reported by name.

    Example: megaray prepare audio --source espeak --out data/speech-tiny --n-fft 512 --hop-length 128
    """
    from megaray.data.audio import prepare_audio
    from megaray.data.hf import HFColumns
    from megaray.data.speech_corpus import build_speech_corpus
    from megaray.fs import check_target
    from megaray.train.launch import ensure_ray

    require_local_sources(source, keywords=("espeak",), hf=True)
    check_target(out, overwrite, how=_OVERWRITE_HOW)
    setup_logging()
    sources = list(source)
    with json_stdout(as_json):
        if "espeak" in sources:
            corpus = Path(out).with_name(Path(out).name + "-raw")
            sources[sources.index("espeak")] = str(build_speech_corpus(str(corpus), n_clips=clips))
        ensure_ray()
        manifest = prepare_audio(
            sources,
            out,
            sample_rate=sample_rate,
            n_mels=n_mels,
            n_fft=n_fft,
            hop_length=hop_length,
            normalize=normalize,
            overwrite=overwrite,
            columns=HFColumns(audio=audio_column, text=text_column, speaker=speaker_column),
        )
    _emit_manifest(manifest, out, as_json, drop=("speakers",))


@prepare_app.command("images")
def prepare_images_cmd(
    source: List[str] = typer.Option(
        ["skimage"],
        "--source",
        "-s",
        help="folder of jpg/png/webp (labels: sub-folder names, sidecar .txt/.json), "
        "WebDataset .tar, parquet with image bytes, jsonl/csv manifest, or an "
        "s3:// gs:// URI; 'skimage' = scikit-image's bundled photographs" + _HF_HELP,
    ),
    image_column: Optional[str] = typer.Option(
        None, help="hf: sources: the image column (default: an Image column, or bytes named image/img/jpg/png)"
    ),
    caption_column: Optional[str] = typer.Option(
        None,
        help="hf: sources: the caption column (default: caption/captions/text/txt/sentence/description, else none)",
    ),
    label_column: Optional[str] = typer.Option(
        None,
        help="hf: sources: the class label column (default: label/labels/class/cls/category, else label 'default')",
    ),
    out: str = typer.Option("data/images", "--out", "-o", help="output directory (parquet shards + manifest.json)"),
    size: int = typer.Option(256, callback=_POSITIVE, help="stored shorter side in pixels"),
    val_fraction: float = typer.Option(
        0.1,
        callback=in_interval(0, 1, low_open=False, high_open=True),
        help="fraction of images held out for validation (by a hash of the name)",
    ),
    seed: int = typer.Option(0, help="seed of the train/val split"),
    overwrite: bool = typer.Option(False, help=_OVERWRITE_HELP),
    as_json: bool = JSON_OPTION,
) -> None:
    """Decode, orient, convert to RGB and resize images in Ray Data; write train/val shards.

    Truncated, undecodable or non-image files are skipped and reported by name.

    Example: megaray prepare images --source skimage --out data/images-64 --size 64
    """
    from megaray.data.hf import HFColumns
    from megaray.data.image import prepare_images
    from megaray.fs import check_target
    from megaray.train.launch import ensure_ray

    require_local_sources(source, keywords=("skimage",), hf=True)
    check_target(out, overwrite, how=_OVERWRITE_HOW)
    setup_logging()
    with json_stdout(as_json):
        manifest = prepare_images(
            source,
            out,
            size=size,
            val_fraction=val_fraction,
            seed=seed,
            overwrite=overwrite,
            before_ray=ensure_ray,
            columns=HFColumns(image=image_column, caption=caption_column, label=label_column),
        )
    _emit_manifest(manifest, out, as_json, drop=("labels",))


@prepare_app.command("audio-latents")
def prepare_audio_latents_cmd(
    vae_checkpoint: str = typer.Option(..., help="audio VAE checkpoint (or its run directory)"),
    shards: Optional[str] = typer.Option(None, help="audio shards to encode (default: the VAE run's data.shards)"),
    out: str = typer.Option(..., "--out", "-o", help="output directory for latent shards"),
    concurrency: int = typer.Option(1, callback=_POSITIVE, help="actors holding the VAE"),
    overwrite: bool = typer.Option(False, help=_OVERWRITE_HELP),
    as_json: bool = JSON_OPTION,
) -> None:
    """Encode audio shards to VAE latents with Ray Data (an actor pool holding the model).

    Example: megaray prepare audio-latents --vae-checkpoint runs/audio-vae-small --out data/speech-latents
    """
    from megaray.fs import check_target
    from megaray.inference.latents import encode_latents
    from megaray.train.checkpoint import load_for_inference
    from megaray.train.launch import ensure_ray

    check_target(out, overwrite, how=_OVERWRITE_HOW)
    shards = _check_latent_inputs(vae_checkpoint, shards)
    setup_logging()
    with json_stdout(as_json):
        vae, _, _ = load_for_inference(vae_checkpoint)
        ensure_ray()
        manifest = encode_latents(shards, out, vae, concurrency=concurrency, overwrite=overwrite)
    _emit_manifest(manifest, out, as_json, drop=("speakers", "vae_config"))


def _check_latent_inputs(vae_checkpoint: str, shards: Optional[str]) -> str:
    """The shards to encode, after checking (from the checkpoint's config.yaml and the shards'
    manifest.json only, no weights and no Ray) that the checkpoint is an audio VAE whose
    ``n_mels`` matches the shards'.

    Raises:
        CheckpointError: no complete checkpoint. ConfigError: not an audio_vae checkpoint.
        DataError: no manifest in ``shards``, or an ``n_mels`` mismatch (both named).
    """
    from megaray.data.manifest import read_manifest
    from megaray.errors import ConfigError, DataError
    from megaray.families import load_config
    from megaray.train.checkpoint import resolve

    ckpt = resolve(vae_checkpoint)
    cfg = load_config(ckpt / "config.yaml")
    if cfg.model.family != "audio_vae":
        raise ConfigError(
            f"--vae-checkpoint {ckpt}: a {cfg.model.family!r} checkpoint, not an audio_vae one "
            "(train one with `megaray train configs/audio_vae_small.yaml`)"
        )
    shards = shards or cfg.data.shards
    n_mels = read_manifest(shards, kind="audio").get("n_mels")
    if n_mels != cfg.model.n_mels:
        raise DataError(
            f"--shards {shards} hold n_mels={n_mels} but the VAE at {ckpt} expects "
            f"n_mels={cfg.model.n_mels}; prepare the audio with `megaray prepare audio "
            f"--n-mels {cfg.model.n_mels}` or pass that run's --shards"
        )
    return shards


@prepare_app.command("image-latents")
def prepare_image_latents_cmd(
    vae_checkpoint: str = typer.Option(..., help="image VAE checkpoint (or its run directory)"),
    source: str = typer.Option(..., "--source", "-s", help="images prepared by `megaray prepare images`"),
    out: str = typer.Option(..., "--out", "-o", help="output directory for latent shards"),
    flip: bool = typer.Option(False, help="also encode every image's horizontally flipped copy"),
    concurrency: int = typer.Option(1, callback=_POSITIVE, help="actors holding the VAE"),
    overwrite: bool = typer.Option(False, help=_OVERWRITE_HELP),
    as_json: bool = JSON_OPTION,
) -> None:
    """Encode prepared images to image-VAE latents (scaling_factor * posterior mean of centre crops)
    with Ray Data, for DiT training.

    Example: megaray prepare image-latents --vae-checkpoint runs/image-vae-tiny --source data/skimage --out data/skimage-latents
    """
    from megaray.data.manifest import read_manifest
    from megaray.errors import ConfigError
    from megaray.families import load_config
    from megaray.fs import check_target
    from megaray.inference.latents import encode_image_latents
    from megaray.train.checkpoint import load_for_inference, resolve
    from megaray.train.launch import ensure_ray

    check_target(out, overwrite, how=_OVERWRITE_HOW)
    ckpt = resolve(vae_checkpoint).resolve()  # CheckpointError naming the path, before Ray starts; absolute
    family = load_config(ckpt / "config.yaml").model.family
    if family != "image_vae":
        raise ConfigError(
            f"--vae-checkpoint {ckpt}: a {family!r} checkpoint, not an image_vae one "
            "(train one with `megaray train configs/image_vae_tiny.yaml`)"
        )
    read_manifest(source, kind="images")
    setup_logging()
    with json_stdout(as_json):
        vae, _, _ = load_for_inference(ckpt)
        ensure_ray()
        manifest = encode_image_latents(
            source, out, vae, vae_checkpoint=str(ckpt), flip=flip, concurrency=concurrency, overwrite=overwrite
        )
    _emit_manifest(manifest, out, as_json, drop=("labels", "vae_config"))


@prepare_app.command("sft")
def prepare_sft_cmd(
    source: List[str] = typer.Option(
        ..., "--source", "-s", help=".jsonl file, folder, glob or URI of {prompt, completion} or {messages} records"
    ),
    tokenizer: str = typer.Option(..., help="tokenizer.json, or a folder holding one (prepared shards, a checkpoint)"),
    out: str = typer.Option(
        ..., "--out", "-o", help="output directory (shards + manifest.json + tokenizer + chat template)"
    ),
    max_tokens: int = typer.Option(
        1024, callback=at_least(2), help="records longer than this are rejected; use the model's block_size + 1"
    ),
    val_fraction: float = typer.Option(
        0.1,
        callback=in_interval(0, 1, low_open=False, high_open=True),
        help="fraction of records held out for validation",
    ),
    overwrite: bool = typer.Option(False, help=_OVERWRITE_HELP),
    as_json: bool = JSON_OPTION,
) -> None:
    """Tokenize chat/completion JSONL through the chat template into fine-tuning shards (loss mask on completions).

    Example: megaray prepare sft --source tests/assets/sft_tiny.jsonl --tokenizer data/stdlib-512 --out data/sft-tiny
    """
    from megaray.data.sft import prepare_sft
    from megaray.fs import check_target

    require_local_sources(source)
    check_target(out, overwrite, how=_OVERWRITE_HOW)
    setup_logging()
    with json_stdout(as_json):
        manifest = prepare_sft(
            source, out, tokenizer, max_tokens=max_tokens, val_fraction=val_fraction, overwrite=overwrite
        )
    _emit_manifest(manifest, out, as_json)


def _emit_manifest(manifest: Dict[str, Any], out: str, as_json: bool, drop: Sequence[str] = ()) -> None:
    """After a prepare command: under ``--json`` the manifest (without the per-item entries in
    ``drop``, which ``manifest.json`` holds) as the only thing on stdout; otherwise one line
    naming ``manifest.json`` below the summary the prepare function printed."""
    path = f"{str(out).rstrip('/')}/manifest.json"
    emit({k: v for k, v in manifest.items() if k not in drop}, as_json, human=f"manifest: {path} (--json prints it)")
