"""Plain text out of any MiniMind data file: what a tokenizer is trained on.

Owns the mapping record -> strings for every kind (pretrain text; each message's content and
reasoning; both sides of a dpo pair). Reading and validation are formats.py's.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from .formats import Conversation, DPORecord, OnError, PretrainRecord, Record, RecordReader, StrPath


def record_texts(record: Record) -> Iterator[str]:
    """The strings of one record.

    >>> from minimind.data.formats import Message
    >>> list(record_texts(Conversation((Message("user", "hi"), Message("assistant", "yo", "hm")))))
    ['hi', 'hm', 'yo']
    """
    if isinstance(record, PretrainRecord):
        yield record.text
        return
    if isinstance(record, DPORecord):
        convs = [record.chosen, record.rejected]
    elif isinstance(record, Conversation):
        convs = [record]
    else:  # RLAIFRecord
        convs = [record.conversation]
    for conv in convs:
        for message in conv.messages:
            if message.reasoning_content:
                yield message.reasoning_content
            if message.content:
                yield message.content


def iter_texts(paths: Iterable[StrPath], on_error: OnError = "raise") -> Iterator[str]:
    """Every string of every record of `paths`, streaming, file after file."""
    for path in paths:
        reader = RecordReader(path, on_error=on_error)
        for record in reader:
            yield from record_texts(record)
        if reader.summary.bad_lines:
            print(reader.summary.format())
