"""Wan 2.2 Animate's face adapter under sequence parallelism.

diffusers' face adapter (WanAnimateFaceBlockCrossAttention) lets each token of latent frame f attend to frame f's
motion tokens only: it splits the S tokens into T equal frames (T = the motion vector's frames). A rank holds a
contiguous slice of the sequence that may start or end inside a frame, so its processor runs diffusers' own processor
once per frame the slice touches, with that frame's motion tokens: the same math per token, no communication. The
slice's padding (past the sequence's end) gets zeros; the gather drops it.
"""
import torch


class VkernWanAnimateFaceSPProcessor:
    """Wraps the face adapter's processor (diffusers' WanAnimateFaceBlockAttnProcessor); outside a sequence-parallel
    forward it is that processor unchanged."""

    def __init__(self, context, processor):
        self.context = context
        self.processor = processor

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
        layout = self.context.layout
        if layout is None:
            return self.processor(attn, hidden_states, encoder_hidden_states, attention_mask)
        if attention_mask is not None:
            raise NotImplementedError("vkern sequence parallelism: the face adapter's motion mask is not sharded; "
                                      "call it without attention_mask (WanAnimateTransformer3DModel's forward does)")
        S, frames = layout.spec.seq_len, encoder_hidden_states.shape[1]
        if S % frames:
            raise ValueError(f"face adapter: the motion vector's {frames} frames do not divide the {S} tokens "
                             f"(diffusers requires it too)")
        per_frame, local = S // frames, hidden_states.shape[1]
        start = self.context.rank * local
        end = min(start + local, S)  # past it: this rank's padding
        real = max(end - start, 0)
        pieces = []
        for f in range(start // per_frame, -(-end // per_frame)):  # the frames the slice touches (none: all padding)
            lo, hi = max(f * per_frame, start), min((f + 1) * per_frame, end)
            pieces.append(self.processor(attn, hidden_states[:, lo - start:hi - start],
                                         encoder_hidden_states[:, f:f + 1], None))
        if real < local:
            pieces.append(hidden_states.new_zeros(hidden_states.shape[0], local - real, hidden_states.shape[2]))
        return torch.cat(pieces, dim=1)
