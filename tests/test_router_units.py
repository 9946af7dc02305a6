"""Unit tests of the router's pure parts: detokenizer, stop strings, validation,
chat templates, placement, error mapping. No servers."""

from __future__ import annotations

import grpc
import pytest
from router_fixtures import SMOLLM2_CHAT_TEMPLATE, byte_model_files, model_files

from orchestrator.chat_template import ChatTemplate
from orchestrator.detokenize import StopMatcher
from orchestrator.errors import (InvalidArgument, ModelNotFound, NoHealthyWorker, Overloaded, WorkerFailed,
                                 grpc_status, http_error_body)
from orchestrator.placement import LeastLoaded, RequestView, RoundRobin, make_policy
from orchestrator.tokenize import TokenizerBundle
from orchestrator.types import ChatMessage, ChatPrompt, Sampling, TextPrompt, TokenPrompt
from orchestrator import validation as v
from orchestrator.workers import WorkerHandle, WorkerLoad

MULTIBYTE_TEXT = "Héllo wörld 🙂 日本語のテキスト and 👍🏽 done"


def bundle_for(files) -> TokenizerBundle:
    return TokenizerBundle.build(files.tokenizer_json, files.chat_template,
                                 bos_token=files.bos_token, eos_token=files.eos_token)


@pytest.fixture(scope="module", params=["byte_level", "model"])
def bundle(request) -> TokenizerBundle:
    return bundle_for(byte_model_files() if request.param == "byte_level" else model_files())


# --- incremental detokenization ---------------------------------------------------------

def test_detokenizer_emits_only_complete_characters(bundle):
    ids = bundle.encode(MULTIBYTE_TEXT, add_special_tokens=False)
    detok = bundle.detokenizer([])
    pieces = [detok.add([t]) for t in ids] + [detok.flush()]
    assert "".join(pieces) == MULTIBYTE_TEXT
    assert not any("\ufffd" in p for p in pieces)


def test_byte_level_characters_span_several_tokens_and_come_out_whole():
    bundle = bundle_for(byte_model_files())
    ids = bundle.encode("🙂", add_special_tokens=False)
    assert len(ids) == 4                      # one token per UTF-8 byte
    detok = bundle.detokenizer([])
    assert [detok.add([t]) for t in ids] == ["", "", "", "🙂"]


def test_detokenizer_with_prompt_context_and_multi_token_messages(bundle):
    prompt = bundle.encode("Say something: ", add_special_tokens=False)
    ids = bundle.encode(MULTIBYTE_TEXT, add_special_tokens=False)
    detok = bundle.detokenizer(prompt)
    pieces = [detok.add(ids[i:i + 3]) for i in range(0, len(ids), 3)] + [detok.flush()]
    assert "".join(pieces) == MULTIBYTE_TEXT


def test_detokenizer_flush_surfaces_an_incomplete_character():
    bundle = bundle_for(byte_model_files())
    ids = bundle.encode("a🙂", add_special_tokens=False)
    detok = bundle.detokenizer([])
    assert "".join(detok.add([t]) for t in ids[:3]) == "a"
    assert detok.flush() == "\ufffd"


def test_special_tokens_are_not_emitted_as_text(bundle):
    ids = bundle.encode("hi", add_special_tokens=False) + [2]    # <|im_end|>
    detok = bundle.detokenizer([])
    assert "".join(detok.add([t]) for t in ids) + detok.flush() == "hi"


def test_token_bytes_of_partial_characters():
    bundle = bundle_for(byte_model_files())
    ids = bundle.encode("é", add_special_tokens=False)
    assert b"".join(bundle.token_bytes(t) for t in ids) == "é".encode()


# --- stop strings ----------------------------------------------------------------------------

def run_stops(stops, pieces):
    matcher = StopMatcher(stops)
    out = []
    for piece in pieces:
        out.append(matcher.feed(piece))
        if matcher.stopped:
            return out, True
    out.append(matcher.flush())
    return out, False


def test_stop_string_split_across_pieces_is_cut_and_held_back():
    out, stopped = run_stops(["STOP"], ["abc S", "T", "OP and more"])
    assert stopped
    assert out == ["abc ", "", ""]            # "S" and "T" were held back, then dropped


def test_held_back_text_is_released_when_it_is_not_a_stop():
    out, stopped = run_stops(["STOP"], ["abc ST", "ONE"])
    assert not stopped
    assert out == ["abc ", "STONE", ""]


def test_earliest_stop_string_wins():
    out, stopped = run_stops(["world", "lo w"], ["hello world"])
    assert stopped and out == ["hel"]


def test_no_stop_strings_pass_text_through():
    out, stopped = run_stops([], ["a", "b"])
    assert out == ["a", "b", ""] and not stopped


def test_stop_string_over_multibyte_tokens():
    """Token by token through the byte-level tokenizer: the stop string's
    characters arrive one byte per token."""
    bundle = bundle_for(byte_model_files())
    ids = bundle.encode("Answer: 日本語 is here", add_special_tokens=False)
    detok, stops = bundle.detokenizer([]), StopMatcher(["本語 is"])
    text = ""
    for t in ids:
        text += stops.feed(detok.add([t]))
        if stops.stopped:
            break
    assert stops.stopped and text == "Answer: 日"


# --- validation -------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [True, 1.5, "3", [1]])
def test_opt_int_rejects_non_integers(value):
    with pytest.raises(InvalidArgument) as e:
        v.opt_int({"max_tokens": value}, "max_tokens")
    assert e.value.field == "max_tokens" and "integer" in e.value.message


@pytest.mark.parametrize("value", [True, "0.5", float("nan"), float("inf")])
def test_opt_float_rejects_non_numbers(value):
    with pytest.raises(InvalidArgument) as e:
        v.opt_float({"temperature": value}, "temperature")
    assert e.value.field == "temperature"


@pytest.mark.parametrize("sampling, field", [
    (Sampling(temperature=-0.1), "temperature"),
    (Sampling(temperature=2.01), "temperature"),
    (Sampling(top_p=0.0), "top_p"),
    (Sampling(top_p=1.5), "top_p"),
    (Sampling(top_k=-1), "top_k"),
    (Sampling(max_tokens=0), "max_tokens"),
    (Sampling(seed=-1), "seed"),
    (Sampling(logprobs=True, top_logprobs=21), "top_logprobs"),
    (Sampling(top_logprobs=1), "top_logprobs"),
    (Sampling(stop=("",)), "stop"),
    (Sampling(stop=tuple("abcdefghijklmnopq")), "stop"),
    (Sampling(stop_token_ids=(100_000,)), "stop_token_ids"),
])
def test_validate_sampling_names_the_field_and_range(sampling, field):
    with pytest.raises(InvalidArgument) as e:
        v.validate_sampling(sampling, vocab_size=1000)
    assert e.value.field == field
    assert field in e.value.message


def test_validate_sampling_accepts_edges():
    v.validate_sampling(Sampling(temperature=0.0, top_p=1.0, top_k=0, max_tokens=1, seed=2**64 - 1,
                                 logprobs=True, top_logprobs=20, stop=("x",) * 16), vocab_size=10)


@pytest.mark.parametrize("prompt, field", [
    (None, "prompt"),
    (TextPrompt(""), "prompt"),
    (TokenPrompt(()), "prompt"),
    (TokenPrompt((5, 1000)), "prompt"),
    (ChatPrompt(()), "messages"),
    (ChatPrompt((ChatMessage("robot", "hi"),)), "messages[0].role"),
])
def test_validate_prompt(prompt, field):
    with pytest.raises(InvalidArgument) as e:
        v.validate_prompt(prompt, vocab_size=1000)
    assert e.value.field == field


def test_context_window_message_gives_both_numbers():
    with pytest.raises(InvalidArgument) as e:
        v.check_context_window(100, 50, 128)
    assert e.value.field == "max_tokens"
    assert "128" in e.value.message and "150" in e.value.message and "100 in the prompt" in e.value.message
    v.check_context_window(100, 28, 128)
    with pytest.raises(InvalidArgument):
        v.check_context_window(128, None, 128)


# --- chat template -------------------------------------------------------------------------------

def test_chat_template_renders_like_hf():
    template = ChatTemplate(SMOLLM2_CHAT_TEMPLATE, bos_token="<|im_start|>", eos_token="<|im_end|>")
    text = template.render([ChatMessage("system", "Be brief."), ChatMessage("user", "Hi")])
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                    "<|im_start|>assistant\n")


def test_chat_template_raise_exception_becomes_invalid_argument():
    source = ("{% for m in messages %}{% if m['role'] == 'system' %}"
              "{{ raise_exception('System role not supported') }}{% endif %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(InvalidArgument) as e:
        ChatTemplate(source).render([ChatMessage("system", "x")])
    assert e.value.field == "messages" and "System role not supported" in e.value.message


def test_chat_template_sees_bos_eos_and_is_sandboxed():
    assert ChatTemplate("{{ bos_token }}|{{ eos_token }}", bos_token="<s>", eos_token="</s>").render([]) == "<s>|</s>"
    with pytest.raises(Exception):
        ChatTemplate("{{ messages.__class__.__mro__ }}").render([])


def test_invalid_chat_template_is_refused_at_build():
    with pytest.raises(ValueError, match="invalid chat template"):
        ChatTemplate("{% for %}")


def test_model_without_template_refuses_chat():
    bundle = TokenizerBundle.build(byte_model_files().tokenizer_json, "")
    with pytest.raises(InvalidArgument, match="no chat template"):
        bundle.render_chat([ChatMessage("user", "hi")])


# --- placement ---------------------------------------------------------------------------------

def handle(worker_id: str, in_flight: int = 0, waiting: int = 0) -> WorkerHandle:
    w = WorkerHandle(worker_id, f"{worker_id}:1", "m", channel=None, stub=None)
    w.in_flight = in_flight
    w.load = WorkerLoad(num_waiting=waiting)
    return w


VIEW = RequestView("r", "m", [1, 2, 3], "", 16)


def test_least_loaded_counts_in_flight_plus_waiting():
    workers = [handle("a", in_flight=2), handle("b", in_flight=0, waiting=3), handle("c", in_flight=1, waiting=0)]
    assert LeastLoaded().choose(VIEW, workers).worker_id == "c"


def test_least_loaded_rotates_ties():
    policy, workers = LeastLoaded(), [handle("a"), handle("b")]
    assert {policy.choose(VIEW, workers).worker_id for _ in range(4)} == {"a", "b"}


def test_round_robin_cycles():
    policy, workers = RoundRobin(), [handle("a"), handle("b"), handle("c")]
    assert [policy.choose(VIEW, workers).worker_id for _ in range(6)] == list("abcabc")


def test_unknown_policy_lists_valid_names():
    with pytest.raises(ValueError, match="kv, least_loaded, random, round_robin"):
        make_policy("fastest")


# --- error mapping -------------------------------------------------------------------------------

@pytest.mark.parametrize("err, code, status", [
    (InvalidArgument("top_p", "bad"), grpc.StatusCode.INVALID_ARGUMENT, 400),
    (ModelNotFound("no such model"), grpc.StatusCode.NOT_FOUND, 404),
    (Overloaded("busy"), grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
    (NoHealthyWorker("none"), grpc.StatusCode.UNAVAILABLE, 503),
    (WorkerFailed("died"), grpc.StatusCode.UNAVAILABLE, 502),
])
def test_one_mapping_to_grpc_and_http(err, code, status):
    assert grpc_status(err)[0] == code
    assert err.http_status == status
    body = http_error_body(err)["error"]
    assert set(body) == {"message", "type", "param", "code"}


def test_invalid_argument_body_names_the_param():
    body = http_error_body(InvalidArgument("top_p", "must be in (0, 1], got 2"))["error"]
    assert body == {"message": "top_p: must be in (0, 1], got 2", "type": "invalid_request_error",
                    "param": "top_p", "code": "invalid_value"}
