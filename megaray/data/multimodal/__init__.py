"""Text, speech and image shards mixed by weight into interleaved sequences (the multimodal family).

``layout``: what one row is (the five sequence layouts of ``task`` 0-4, boundary ids, span
content: normalised log-mel crops, [-1, 1] image squares, VAE latents as stored).
``reader``: the mixture (sources by manifest kind, the seeded per-pass item plan, row-group
reads inside Ray Data ``map_batches``, :func:`mixture_datasets`). docs/data.md, "Multimodal
mixtures", has the whole picture.
"""

from megaray.data.multimodal.layout import (  # noqa: F401
    AUDIO_TO_TEXT,
    CAPTION_TEMPLATE,
    COLUMNS,
    IGNORE,
    IMAGE_TO_TEXT,
    MODALITY,
    P_GENERATE,
    TASKS,
    TEXT_LM,
    TEXT_TO_AUDIO,
    TEXT_TO_IMAGE,
    Layout,
    audio_latent_frames,
    crop_frames,
    crop_mel,
    sequence,
    span_prompt,
    square_image,
)
from megaray.data.multimodal.reader import (  # noqa: F401
    CACHE_GROUPS,
    MixSource,
    audio_content,
    build_rows,
    cached_tokenizer,
    image_content,
    label_names,
    mixture_datasets,
    open_sources,
    plan_items,
    read_specs,
    source_order,
)
