"""The fixed token inventory of every MiniMind tokenizer.

Ids 0-2 are MiniMind2's special tokens (control tokens: skipped by
`decode(skip_special_tokens=True)`). The tag tokens are added tokens too, so they are never
split, but they are not special: they are part of what the model says and decode visibly.
Our trainer reserves them ids 3-10; the MiniMind2 reference tokenizer does not have them and
splits them into several pieces.
"""

ENDOFTEXT = "<|endoftext|>"  # id 0: pad and unk
IM_START = "<|im_start|>"  # id 1: bos
IM_END = "<|im_end|>"  # id 2: eos
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)

TAG_TOKENS = (
    "<think>",
    "</think>",
    "<answer>",
    "</answer>",
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
)
