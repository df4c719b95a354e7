"""Training tools: they make the weights the codec runs, and may use the codec to measure them.

`train` (the training loop), `losses` (the target-rate objectives), `freeze` (a
checkpoint to the frozen file the codec ships) and `widen` (change a checkpoint's
latent width or add a rate level). The dependency goes one way: these modules
import the model runtime of `lcodec.models` and `lcodec.engine`; nothing the codec
imports reaches back into this package.
"""
