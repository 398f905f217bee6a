"""``asyncllm chat``'s line handling on the tiny engine: commands, transcripts, stats and Ctrl-C."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path
from typing import Any

from asyncllm.chat_console import ChatConsole

SAMPLING = {"max_tokens": 4, "temperature": 0.0}


def console_for(engine: Any, **kwargs: Any) -> tuple[ChatConsole, io.StringIO, io.StringIO]:
    out, err = io.StringIO(), io.StringIO()
    return ChatConsole(engine, sampling=kwargs.pop("sampling", SAMPLING), out=out, err=err, **kwargs), out, err


async def test_commands_never_reach_the_model(make_tiny_engine: Any) -> None:
    async with make_tiny_engine() as engine:
        console, out, err = console_for(engine)
        assert await console.handle("/help")
        assert "/save FILE" in err.getvalue() and "/stats" in err.getvalue()
        assert await console.handle("/stats")
        assert "(no reply yet)" in err.getvalue()
        assert await console.handle("/frobnicate now")
        assert "error: unknown command /frobnicate" in err.getvalue()
        assert await console.handle("   ")
        assert out.getvalue() == "" and console.chat.messages == [] and console.last is None
        assert not await console.handle("/exit")
        await console.close()


async def test_a_message_streams_a_reply_and_stats_report_it(make_tiny_engine: Any) -> None:
    async with make_tiny_engine() as engine:
        console, out, err = console_for(engine)
        assert await console.handle("Hello there")
        assert out.getvalue().endswith("\n") and len(console.chat.messages) == 2
        assert await console.handle("And again")  # the second turn reuses the first turn's KV
        stats = console.last
        assert stats is not None and stats.completion_tokens == 4 and not stats.stopped
        assert stats.cached_tokens is not None and stats.cached_tokens > 0
        assert await console.handle("/stats")
        assert "last reply: 4 tokens" in err.getvalue() and "tok/s" in err.getvalue()
        assert f"{stats.cached_tokens} of them cached" in err.getvalue()
        assert await console.handle("//literal slash")
        assert console.chat.messages[-2] == {"role": "user", "content": "/literal slash"}
        await console.close()


async def test_system_save_load_round_trip(make_tiny_engine: Any, tmp_path: Path) -> None:
    path = tmp_path / "chat.json"
    async with make_tiny_engine() as engine:
        console, _out, err = console_for(engine, system="Be brief.")
        assert await console.handle("Hi")
        assert await console.handle("/system Be verbose.")
        assert console.chat.messages[0] == {"role": "system", "content": "Be verbose."}
        assert len(console.chat.messages) == 3  # the turn so far is kept
        assert await console.handle(f"/save {path}")
        saved = json.loads(path.read_text())
        assert saved == console.chat.messages
        assert await console.handle("/reset")
        assert console.chat.messages == [{"role": "system", "content": "Be verbose."}]
        assert await console.handle(f"/load {path}")
        assert console.chat.messages == saved
        assert await console.handle("Go on")  # the loaded transcript is the context of the next turn
        assert console.chat.messages[:3] == saved and len(console.chat.messages) == 5
        assert await console.handle(f"/load {tmp_path / 'missing.json'}")
        path.write_text('{"not": "a list"}')
        assert await console.handle(f"/load {path}")
        assert await console.handle("/save")
        assert err.getvalue().count("error: /load") == 2 and "error: /save needs a file name" in err.getvalue()
        assert len(console.chat.messages) == 5  # failed loads change nothing
        await console.close()


async def test_interrupt_stops_the_reply_and_the_chat_goes_on(make_tiny_engine: Any) -> None:
    async with make_tiny_engine() as engine:
        console, out, err = console_for(engine, sampling={"max_tokens": 2000, "temperature": 0.0,
                                                          "ignore_eos": True})
        assert not console.interrupt()  # nothing to stop
        turn = asyncio.ensure_future(console.handle("Tell me everything"))
        while not out.getvalue():
            await asyncio.sleep(0.005)
        assert console.interrupt()
        assert await asyncio.wait_for(turn, 10)  # the handler returns: the chat continues
        assert "(reply stopped)" in err.getvalue()
        assert console.last is not None and console.last.stopped and console.last.completion_tokens < 2000
        assert console.chat.messages == []  # a stopped turn stays out of the transcript
        console.sampling = SAMPLING
        assert await console.handle("Short one")
        assert len(console.chat.messages) == 2
        await console.close()


async def test_cancelling_the_caller_still_propagates(make_tiny_engine: Any) -> None:
    async with make_tiny_engine() as engine:
        console, out, _ = console_for(engine, sampling={"max_tokens": 2000, "ignore_eos": True})
        turn = asyncio.ensure_future(console.handle("Tell me everything"))
        while not out.getvalue():
            await asyncio.sleep(0.005)
        turn.cancel()
        try:
            await turn
        except asyncio.CancelledError:
            pass
        else:
            raise AssertionError("the cancellation was swallowed")
        assert not console.chat.busy
        await console.close()


async def test_fenced_and_pasted_lines_are_one_message(make_tiny_engine: Any) -> None:
    async with make_tiny_engine() as engine:
        console, out, _err = console_for(engine)
        assert console.prompt == "> "
        assert await console.handle('"""first line')
        assert console.prompt == "... " and out.getvalue() == ""
        assert await console.handle("/help is text here")
        assert await console.handle('last line"""')
        assert console.prompt == "> "
        assert console.chat.messages[-2] == {"role": "user",
                                             "content": "first line\n/help is text here\nlast line"}
        assert out.getvalue().strip()  # one reply
        assert await console.handle('"""one-liner"""')
        assert console.chat.messages[-2]["content"] == "one-liner"
        assert await console.handle("pasted\nblock of\nthree lines")  # a bracketed paste: one line read
        assert console.chat.messages[-2]["content"] == "pasted\nblock of\nthree lines"
        assert len(console.chat.messages) == 6
        await console.close()
