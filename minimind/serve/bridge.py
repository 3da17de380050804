"""The batcher seen from asyncio: submit a request's choices, await their tokens, cancel them.

The batcher's worker thread calls each request's sink once per token; the sink appends to a
`Channel` and wakes the event loop through `call_soon_threadsafe` at most once per batch of
tokens (a step of 32 rows is one wake-up per waiting task, not 32), so a task that falls
behind receives several tokens at once and sends them as one chunk.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Sequence

from minimind.infer.batcher import Batcher, QueueFull, Request
from minimind.infer.generation import GenerationConfig

from .errors import APIError, bad_request

Event = tuple[int, int | None, str | None]  # (choice index, token or None, finish reason)


class Channel:
    """Events from any thread to one asyncio task on `loop`."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._items: collections.deque = collections.deque()
        self._ready = asyncio.Event()
        self._wake_pending = False

    def put(self, item) -> None:
        # Append first, then read the flag: a wake-up that is pending runs after the append,
        # so the task never sleeps with an item queued.
        self._items.append(item)
        if not self._wake_pending:
            self._wake_pending = True
            self._loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        self._wake_pending = False
        self._ready.set()

    async def get(self) -> list:
        """Every item queued so far (at least one; waits for it)."""
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        out = []
        while self._items:
            out.append(self._items.popleft())
        return out


class Submission:
    """The choices of one API request in the batcher, and their events on one channel."""

    def __init__(
        self, batcher: Batcher, prompts: Sequence[list[int]], configs: Sequence[GenerationConfig]
    ):
        self.channel = Channel(asyncio.get_running_loop())
        self.requests: list[Request] = []
        try:
            for i, (prompt, config) in enumerate(zip(prompts, configs)):
                sink = lambda token, reason, i=i: self.channel.put((i, token, reason))  # noqa: E731
                self.requests.append(batcher.submit(prompt, config, sink))
        except QueueFull as exc:
            self.cancel()
            raise APIError(
                429,
                f"The server is busy ({exc}); retry shortly.",
                type="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": "1"},
            ) from None
        except ValueError as exc:
            self.cancel()
            raise bad_request(str(exc)) from None
        except RuntimeError as exc:
            self.cancel()
            msg = f"The server is shutting down ({exc})."
            raise APIError(503, msg, type="server_error", code="shutting_down") from None

    async def events(self) -> list[Event]:
        return await self.channel.get()

    def cached(self, n: int) -> int:
        """Prompt tokens read from the prefix cache, summed over the prompts (each prompt's n
        choices are consecutive requests; its first one's count: they share its prefill)."""
        return sum(request.cached for request in self.requests[::n])

    def cancel(self, choice: int | None = None) -> None:
        """Stop one choice, or all: their rows leave the batch at the next step."""
        for request in self.requests if choice is None else [self.requests[choice]]:
            request.cancel()
