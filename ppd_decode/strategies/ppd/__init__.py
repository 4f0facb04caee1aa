"""The PPD engine: exact greedy generation pipelined over two worker processes (docs/method.md, deployment 1).

Worker A holds layers 1..d and the early head; worker B holds layers d+1..L and the final head; each keeps the KV
cache of its own layers, and only hidden states and token ids cross between them (torch.distributed point to point:
gloo on CPUs and between processes sharing one GPU, NCCL between two GPUs; see ``PPDConfig.device_a``).
While B finishes token t, A runs the head's k guesses for token t+1 through its layers as one block of siblings
(each attends to the cached prefix and itself). When B's token arrives: on a match A keeps that guess's cache
entries and hands B its hidden state at once; on a miss A runs the real token. B only ever emits its own argmax,
so the output is the model's greedy output whatever the head.

With text chains (``chain``, on by default) the lookup guess brings the tokens that followed it in the text; when it
is B's token, B verifies guess and chain as one block and emits its own argmax up to the first chain token that
differs, so a copied stretch costs one B step instead of one per token.

The guesses are the head's top ones (over its trained shortlist of frequent tokens, 1/12 of a full projection on
SmolLM2), led by ``lookup`` prompt-lookup guesses: the token that followed the text's last n-gram before.

The driver (the caller's process) starts the workers once; they serve many prompts. A worker that dies or falls
silent never yields a wrong token: the driver stops both workers and finishes the request with plain greedy
decoding from the tokens already decided (or raises ``WorkerError`` with ``fallback=False``).

Layout: ``config`` (settings), ``wire`` (what crosses between the workers), ``workers`` (A and B), ``driver``
(the engine and the registered ``ppd`` strategy).
"""

from ppd_decode.strategies.ppd.config import PPDConfig, PPDStats, WorkerError
from ppd_decode.strategies.ppd.driver import PPD, PPDEngine
from ppd_decode.strategies.ppd.workers import A_PARTS, B_PARTS

__all__ = ["A_PARTS", "B_PARTS", "PPD", "PPDConfig", "PPDStats", "PPDEngine", "WorkerError"]
