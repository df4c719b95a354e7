"""kodak_eval: compare lcodec with peer codecs on real files, in one run.

Every codec is measured on the same images, the same machine and real byte
counts: rate-distortion (PSNR, SSIM, MS-SSIM vs bpp), rate accuracy against
each target, BD-rate, and encode/decode time. `python -m kodak_eval --help`;
the library entry point is `kodak_eval.evaluate.evaluate`.

Modules: `metrics` (definitions of every number), `codecs` (lcodec and the
peers behind one interface), `search` (bisection of a peer's quality knob to a
byte budget), `bench` (the run loop and the peer cache), `summary`
(aggregation, BD, speed), `report` (JSON, Markdown, plots). Beside the run:
`model_table` (the model card's table: one model at its own levels), `speed`,
`large_images` and `latent_bound`.
"""
