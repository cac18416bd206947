"""Behaviours every EngineProtocol implementation shares; run against the real Engine and FakeEngine."""

import asyncio

import pytest

from sgl_jax.engine import EngineProtocol
from sgl_jax.engine.prepare import PreparedRequest
from sgl_jax.errors import InvalidRequestError


def check_engine_protocol(engine, prompt_ids):
    assert isinstance(engine, EngineProtocol)
    assert engine.health() == (True, "ok")
    assert engine.abort("no-such-rid") is False
    with pytest.raises(InvalidRequestError, match="temperature"):
        engine.prepare(input_ids=prompt_ids, sampling_params={"temperature": -1})
    with pytest.raises(InvalidRequestError, match="input_ids"):
        engine.prepare(input_ids=[])
    with pytest.raises(InvalidRequestError, match="unknown sampling parameter"):
        engine.prepare(input_ids=prompt_ids, sampling_params={"nope": 1})
    prep = engine.prepare(input_ids=prompt_ids, sampling_params={"max_new_tokens": 30, "ignore_eos": True,
                                                                 "temperature": 0}, rid="shared-rid")
    assert isinstance(prep, PreparedRequest) and prep.input_ids == tuple(prompt_ids)

    async def go():
        gen = engine.generate_stream(prepared=prep)
        first = await gen.__anext__()
        assert first["meta_info"]["finish_reason"] is None and first["meta_info"]["id"] == "shared-rid"
        dup = engine.generate_stream(prepared=prep)
        with pytest.raises(InvalidRequestError, match="already in use"):
            await dup.__anext__()
        assert engine.abort("shared-rid") is True
        last = first
        async for ev in gen:
            last = ev
        return last

    last = asyncio.run(go())
    assert last["meta_info"]["finish_reason"]["type"] == "abort"
    assert engine.abort("shared-rid") is False
    engine.check_integrity()
