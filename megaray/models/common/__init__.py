"""Network components shared by the model families (network code only: no files, data or tasks).

``attention`` (self-attention causal or bidirectional, spans, cross-attention, kernels),
``position`` (1-D schemes, 2-D sin-cos and RoPE), ``norm``, ``mlp``, ``moe`` (with ``experts``:
grouped expert MLPs, and ``peer``: product-key single-neuron experts), ``conditioning``
(FiLM, adaLN-Zero, timestep embedding), ``conv`` (ResNet block, down/upsampling) and ``dsp``
(STFT, iSTFT, mel filterbank, log-mel, Griffin-Lim). See docs/models.md.
"""
