"""enrich and sample on plain dicts; the [pipeline] configuration."""

from __future__ import annotations

import pytest
from auditpipe.processors import build_chain, chain_for
from auditpipe.processors.enrich import EnrichConfig, EnrichStep
from auditpipe.processors.sample import SampleConfig, SampleStep
from auditpipe.schemas import encode, new_event

from auditpipe.errors import ConfigError


def chat(**fields):  # type: ignore[no-untyped-def]
    base = {
        "model": "gpt-4o-2024-08-06",
        "input": {"model": "gpt-4o", "messages": [{"role": "user", "content": "hello there"}]},
        "output": {
            "choices": [{"message": {"role": "assistant", "content": "hi, how can I help?"}}]
        },
        "usage": {
            "prompt_tokens": 2_000_000,
            "completion_tokens": 1_000_000,
            "total_tokens": 3_000_000,
        },
    }
    base.update(fields)
    return new_event(**base)


class TestEnrich:
    def test_cost_from_the_longest_matching_price(self) -> None:
        out = EnrichStep()(chat())
        assert out["cost"] == {
            "input_usd": 5.0,
            "output_usd": 10.0,
            "total_usd": 15.0,
            "estimated": False,
        }
        mini = EnrichStep()(chat(model="gpt-4o-mini-2024-07-18"))
        assert mini["cost"]["input_usd"] == pytest.approx(0.3)

    def test_user_prices_override_defaults(self) -> None:
        step = EnrichStep(
            EnrichConfig(prices={"gpt-4o": {"input_per_mtok": 1, "output_per_mtok": 1}})
        )
        assert step(chat())["cost"]["total_usd"] == 3.0

    def test_unknown_model_gets_no_cost(self) -> None:
        assert EnrichStep()(chat(model="my-private-model"))["cost"] is None

    def test_missing_usage_is_estimated_and_flagged(self) -> None:
        out = EnrichStep()(chat(usage=None))
        assert out["usage_estimated"] is True and out["cost"]["estimated"] is True
        assert out["usage"]["prompt_tokens"] > 0 and out["usage"]["completion_tokens"] > 0
        assert out["processing"][-1]["counts"]["usage_estimated"] == 1

    def test_tenant_and_user_from_metadata_or_headers(self) -> None:
        out = EnrichStep()(chat(metadata={"tenant": "acme"}, headers={"x-user-id": "u7"}))
        assert out["tenant"] == "acme" and out["user"] == "u7"

    def test_tags_and_received_time(self) -> None:
        out = EnrichStep(EnrichConfig(tags={"environment": "prod"}))(chat())
        assert out["tags"] == {"environment": "prod"} and out["received_ts_ms"] >= out["ts_ms"]

    def test_fingerprint_ignores_volatile_keys_and_differs_by_content(self) -> None:
        step = EnrichStep()
        a = step(chat(input={"messages": [{"content": "x"}], "metadata": {"run": "1"}}))
        b = step(chat(input={"messages": [{"content": "x"}], "metadata": {"run": "2"}}))
        c = step(chat(input={"messages": [{"content": "y"}]}))
        assert a["fingerprint"] == b["fingerprint"] != c["fingerprint"]

    def test_output_is_still_a_valid_event(self) -> None:
        encode(EnrichStep()(chat()))

    def test_bad_source_names_the_key(self) -> None:
        with pytest.raises(ConfigError, match=r"pipeline\.enrich\.tenant_from"):
            build_chain({"steps": ["enrich"], "enrich": {"tenant_from": ["cookie:x"]}})


class TestSample:
    def test_deterministic_by_key_and_close_to_the_rate(self) -> None:
        step = SampleStep(SampleConfig(default_rate=0.25, keep_when=[]))
        kept = [step(new_event(request_id=f"r{i}")) for i in range(4000)]
        again = [step(new_event(request_id=f"r{i}")) for i in range(4000)]
        assert [k is None for k in kept] == [k is None for k in again]
        share = sum(k is not None for k in kept) / 4000
        assert 0.22 < share < 0.28
        assert all(k["sample_rate"] == 0.25 for k in kept if k is not None)

    def test_first_matching_rule_sets_the_rate(self) -> None:
        step = SampleStep(
            SampleConfig(
                default_rate=1.0,
                keep_when=[],
                rules=[{"model": "demo-*", "rate": 0.0}, {"status": "5xx", "rate": 1.0}],
            )
        )
        assert step(new_event(model="demo-echo-1")) is None
        assert step(new_event(model="gpt-4o"))["sample_rate"] == 1.0

    def test_keep_when_conditions_are_never_sampled_out(self) -> None:
        step = SampleStep(SampleConfig(default_rate=0.0))  # keep_when: error, redacted
        assert step(new_event(status_code=500))["sample_rate"] == 1.0
        redacted = new_event(
            processing=[
                {"step": "redact", "version": "1", "action": "redacted", "ts_ms": 0, "counts": {}}
            ]
        )
        assert step(redacted) is not None
        assert step(new_event(status_code=200)) is None
        store = SampleStep(SampleConfig(default_rate=0.0, keep_when=["store"]))
        assert store(new_event(store=True)) is not None

    def test_rule_without_condition_is_refused(self) -> None:
        with pytest.raises(ConfigError, match=r"pipeline\.sample\.rules\.0"):
            build_chain({"steps": ["sample"], "sample": {"rules": [{"rate": 0.5}]}})


class TestPipelineConfig:
    def test_default_chain(self) -> None:
        assert [getattr(s, "__name__", "") for s in chain_for({})] == [
            "enrich",
            "redact",
            "sample",
        ]

    def test_unknown_step_lists_installed_ones(self) -> None:
        with pytest.raises(ConfigError, match=r"unknown step 'anonymise'.*redact"):
            build_chain({"steps": ["anonymise"]})

    def test_table_for_a_step_not_in_the_chain(self) -> None:
        with pytest.raises(ConfigError, match=r"\[pipeline\.sample\]"):
            build_chain({"steps": ["redact"], "sample": {"default_rate": 0.5}})

    def test_unknown_key_in_a_step_table(self) -> None:
        with pytest.raises(ConfigError, match=r"pipeline\.redact\.colour: unknown key"):
            build_chain({"redact": {"colour": "red"}})


class TestTypedConfig:
    def test_the_generic_argument_is_the_config_model(self) -> None:
        """``ProcessorStep[C]`` and ``Sink[C]`` set ``Config = C``: the model is named once."""
        from auditpipe.processors.sample import SampleConfig, SampleStep
        from auditpipe.sinks.file import FileConfig, FileSink

        assert SampleStep.Config is SampleConfig and FileSink.Config is FileConfig
        assert isinstance(SampleStep().config, SampleConfig)

    def test_a_config_that_contradicts_the_generic_argument_is_refused(self) -> None:
        """Declaring ``Step[A]`` with ``Config = B`` fails at class creation, naming both."""
        from pydantic import Field

        from auditpipe.settings import StrictModel
        from auditpipe.steps import ProcessorStep

        class A(StrictModel):
            a: int = Field(1, description="a")

        class B(StrictModel):
            b: int = Field(1, description="b")

        with pytest.raises(
            TypeError, match=r"Wrong.Config is .B. but the class is declared as ProcessorStep\[A\]"
        ):

            class Wrong(ProcessorStep[A]):
                name = "wrong"
                Config = B
