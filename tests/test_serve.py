"""The OpenAI-compatible server (python -m kangaroo_jax.serve) driven by the official `openai` client on 127.0.0.1:
plain and streaming answers, video / image / data: URLs / image-sequence frames, multi-turn, the 400 / 413 / 503
errors, and 16 concurrent clients whose greedy answers equal the single-request answers while the server batches
them. Tiny random model (tests.test_inference_chat); uvicorn in a background thread on a free port."""

import base64
import collections
import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
from flax import nnx
from PIL import Image

pytest.importorskip("fastapi", reason="the [serve] extra (fastapi) is not installed")
pytest.importorskip("uvicorn", reason="the [serve] extra (uvicorn) is not installed")
openai = pytest.importorskip("openai", reason="the openai client (test extra) is not installed")

from kangaroo_jax.inference.chat import Chat  # noqa: E402
from kangaroo_jax.inference.sampling import SamplingConfig  # noqa: E402
from kangaroo_jax.models import Kangaroo  # noqa: E402
from kangaroo_jax.pretrained import from_pretrained, save_pretrained  # noqa: E402
from kangaroo_jax.serve import __main__ as serve_cli  # noqa: E402
from kangaroo_jax.serve.prepare import Prepared  # noqa: E402
from kangaroo_jax.serve.protocol import Defaults  # noqa: E402
from kangaroo_jax.serve.service import ServeOptions, Service  # noqa: E402
from kangaroo_jax.tokenizer import load_tokenizer  # noqa: E402
from tests.test_inference_chat import ROOT, tiny_config, tiny_tokenizer_dir, write_video  # noqa: E402

pytestmark = pytest.mark.xdist_group("serve")  # with test_serve_browser.py: one worker, one compiled engine

NUM_FRAMES = 4
MAX_POSITIONS = 300
GREEDY = dict(temperature=0, max_tokens=6)
_SHARED: dict = {}


def shared_assets(tmp_path_factory) -> dict:
  """Checkpoint, media and a Chat (its engine compiles once per process), built once for both server test files."""
  if not _SHARED:
    d = tmp_path_factory.mktemp("serve")
    tok_dir = tiny_tokenizer_dir(str(d / "tok"))
    ckpt = save_pretrained(Kangaroo(tiny_config(load_tokenizer(tok_dir)), rngs=nnx.Rngs(0)), tok_dir, str(d / "ckpt"))
    examples = d / "examples"
    examples.mkdir()
    video = write_video(str(examples / "clip.mp4"))
    image = str(examples / "photo.png")
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (40, 70, 3), dtype=np.uint8)).save(image)
    frames = d / "frames"
    frames.mkdir()
    for i in range(6):
      Image.fromarray(np.full((32, 32, 3), 30 * i, np.uint8)).save(str(frames / f"{i:03d}.png"))
    model, tokenizer = from_pretrained(ckpt)
    chat = Chat(model, tokenizer, max_positions=MAX_POSITIONS)
    _SHARED.update(dir=d, ckpt=ckpt, video=video, image=image, frames=str(frames), examples=str(examples), chat=chat)
  return _SHARED


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def running_server(assets: dict, **options):
  """A Service on the shared Chat behind uvicorn in a thread; yields (base URL, service)."""
  import uvicorn

  from kangaroo_jax.serve.app import create_app

  opts = dict(
      model_name="tiny-kangaroo",
      num_frames=NUM_FRAMES,
      max_batch=4,
      max_queue=32,
      batch_window_s=0.05,
      examples_dir=assets["examples"],
      defaults=Defaults(max_tokens=6),
  )
  service = Service(assets["chat"], ServeOptions(**dict(opts, **options)))
  port = _free_port()
  server = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=port, log_level="warning"))
  thread = threading.Thread(target=server.run, daemon=True)
  thread.start()
  deadline = time.monotonic() + 30
  while not server.started:
    assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
    time.sleep(0.02)
  try:
    yield f"http://127.0.0.1:{port}", service
  finally:
    server.should_exit = True
    thread.join(30)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
  return shared_assets(tmp_path_factory)


@pytest.fixture(scope="module")
def server(assets):
  with running_server(assets) as (url, service):
    yield dict(
        url=url,
        service=service,
        client=openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120),
    )


def _video_message(url: str, text: str, kind: str = "video_url") -> dict:
  return {"role": "user", "content": [{"type": kind, kind: {"url": url}}, {"type": "text", "text": text}]}


def _ask(client, messages, **kw) -> str:
  return (
      client.chat.completions.create(model="tiny-kangaroo", messages=messages, **dict(GREEDY, **kw))
      .choices[0]
      .message.content
  )


def _chat_answer(assets, path, query, history=None) -> str:
  """The same question through the chat API (greedy), the reference for the server's answers."""
  answer, _ = assets["chat"].chat(path, query, history, num_frames=NUM_FRAMES, max_new_tokens=6, do_sample=False)
  return answer


def _data_url(path: str, mime: str) -> str:
  with open(path, "rb") as f:
    return f"data:{mime};base64," + base64.b64encode(f.read()).decode()


def test_models_health_plain_and_streaming_video(assets, server):
  client = server["client"]
  assert [m.id for m in client.models.list().data] == ["tiny-kangaroo"]
  health = httpx.get(server["url"] + "/health").json()
  assert health["status"] == "ok" and health["model"] == "tiny-kangaroo"
  messages = [_video_message(assets["video"], "What happens in the video?")]
  resp = client.chat.completions.create(model="anything", messages=messages, **GREEDY)
  answer = resp.choices[0].message.content
  assert answer == _chat_answer(assets, assets["video"], "What happens in the video?")
  assert resp.model == "anything" and resp.choices[0].finish_reason in ("stop", "length")
  assert resp.usage.prompt_tokens > 8 and 1 <= resp.usage.completion_tokens <= 6  # 8 visual tokens in the prompt
  # Streaming: role first, then the same text in pieces, a finish reason, usage on request, [DONE] (the client ends).
  chunks = list(
      client.chat.completions.create(
          model="anything", messages=messages, stream=True, stream_options={"include_usage": True}, **GREEDY
      )
  )
  assert chunks[0].choices[0].delta.role == "assistant"
  pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
  assert len(pieces) >= 2 and "".join(pieces) == answer
  assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == resp.choices[0].finish_reason
  assert chunks[-1].usage.completion_tokens == resp.usage.completion_tokens
  # The wire format: "data: {chunk}" events, the last one "data: [DONE]"; max_tokens cuts the answer.
  body = {"model": "m", "messages": messages, "stream": True, "temperature": 0, "max_tokens": 2}
  with httpx.stream("POST", server["url"] + "/v1/chat/completions", json=body, timeout=60) as raw:
    assert raw.headers["content-type"].startswith("text/event-stream")
    events = [line for line in raw.iter_lines() if line]
  assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
  assert '"finish_reason": "length"' in events[-2]
  # file:// and a base64 data: URL of the same file give the same answer; the data's temporary file is gone.
  assert _ask(client, [_video_message("file://" + assets["video"], "What happens in the video?")]) == answer
  assert _ask(client, [_video_message(_data_url(assets["video"], "video/mp4"), "What happens in the video?")]) == answer
  tmp_root = server["service"].tmp_root
  assert sorted(os.listdir(tmp_root)) == ["uploads"]


def test_images_frames_and_text_only(assets, server):
  client = server["client"]
  expected = _chat_answer(assets, assets["image"], "Describe the picture.")
  assert _ask(client, [_video_message(assets["image"], "Describe the picture.", "image_url")]) == expected
  assert (
      _ask(client, [_video_message(_data_url(assets["image"], "image/png"), "Describe the picture.", "image_url")])
      == expected
  )
  # Several image_url parts = the frames of one video (lmms-eval's openai_compatible): as the frame folder.
  names = sorted(os.listdir(assets["frames"]))
  parts = [
      {"type": "image_url", "image_url": {"url": _data_url(os.path.join(assets["frames"], n), "image/png")}}
      for n in names
  ]
  frames_msg = {"role": "user", "content": [{"type": "text", "text": "What changes?"}] + parts}  # lmms-eval's order
  assert _ask(client, [frames_msg]) == _chat_answer(assets, assets["frames"], "What changes?")
  decoded = server["service"].cache.decodes
  two = {"role": "user", "content": [{"type": "text", "text": "What changes?"}] + parts[:2]}
  assert isinstance(_ask(client, [two]), str)
  assert server["service"].cache.decodes == decoded + 1
  assert [v.grid[0] for v in server["service"].cache._items.values()][-1] == 2  # the 2 frames sent, not 4
  assert _ask(client, [{"role": "user", "content": "Hello kangaroo"}]) == _chat_answer(assets, None, "Hello kangaroo")


def test_sampling_seed_reproduces(server):
  kw = dict(temperature=1.0, top_p=0.95, seed=7, max_tokens=6)
  first = _ask(server["client"], [{"role": "user", "content": "Say something."}], **kw)
  assert _ask(server["client"], [{"role": "user", "content": "Say something."}], **kw) == first


def test_which_requests_share_an_engine_call(server):
  """Greedy requests batch whatever their seed; sampled ones with equal settings and no seed batch; a seeded
  sampled request runs alone; a different prefill chunk size or visual token count never shares a call."""
  batcher = server["service"].batcher
  ids = lambda n, vis=0: np.array([batcher.engine.visual_token_id] * vis + [5] * n, np.int32)  # noqa: E731
  sampled = SamplingConfig(do_sample=True, temperature=0.7, top_p=0.9)

  jobs = []

  def key(prompt, sampling=SamplingConfig(), seed=None):
    jobs.append(object())  # a distinct live job each time
    return batcher.group_key(Prepared(prompt, None, 6, sampling, seed), jobs[-1])

  assert key(ids(20)) == key(ids(30))  # one 32-token prefill chunk
  assert key(ids(20)) != key(ids(40))  # 32 vs 64
  assert key(ids(20)) != key(ids(12, vis=8))  # visual tokens
  assert key(ids(20), sampled) == key(ids(25), sampled) != key(ids(20))
  assert key(ids(20), sampled, seed=1) != key(ids(20), sampled, seed=1)  # alone, so the seed reproduces


def test_padding_leaves_a_rows_logits_as_alone(assets):
  """Why batched greedy answers equal single ones: a row's first-token logits in a right-padded batch of other
  lengths equal its logits alone up to float rounding (a padding or masking leak would be of order 1)."""
  engine = assets["chat"].engine
  rows = [list(np.random.RandomState(n).randint(5, 300, size=n)) for n in (17, 23, 32, 5, 20)]

  def first_logits(prompts):
    n = max(map(len, prompts))
    ids = np.zeros((len(prompts), n), np.int32)
    for r, p in enumerate(prompts):
      ids[r, : len(p)] = p
    cache = engine.new_cache(len(prompts), 64)
    return np.asarray(engine.prefill(cache, engine.embed(ids, length=32), [len(p) for p in prompts])[1])

  batched = first_logits(rows)
  for r, p in enumerate(rows):
    alone = first_logits([p])[0]
    np.testing.assert_allclose(batched[r], alone, rtol=0, atol=1e-5 * np.abs(alone).max())
    assert batched[r].argmax() == alone.argmax()


def test_multi_turn_equals_chat_history_and_reuses_the_video(assets, server):
  client, service = server["client"], server["service"]
  q1, q2 = "What happens in the video?", "What colour is the car?"
  a1, h1 = assets["chat"].chat(assets["video"], q1, num_frames=NUM_FRAMES, max_new_tokens=6, do_sample=False)
  expected = _chat_answer(assets, assets["video"], q2, history=list(h1))
  decoded = service.cache.decodes
  messages = [
      _video_message(assets["video"], q1),
      {"role": "assistant", "content": a1},
      {"role": "user", "content": q2},
  ]
  assert _ask(client, messages) == expected
  assert service.cache.decodes == decoded  # the first turn's decoded video was reused
  with_system = [{"role": "system", "content": "Answer briefly."}] + messages
  assert isinstance(_ask(client, with_system), str)


def test_uploaded_video_answers_like_the_path(assets, server):
  with open(assets["video"], "rb") as f:
    up = httpx.post(server["url"] + "/v1/uploads", files={"file": ("my clip.mp4", f, "video/mp4")}).json()
  assert up["url"].startswith("file://") and up["url"].endswith(".mp4") and up["filename"] == "my clip.mp4"
  q = "What happens in the video?"
  assert _ask(server["client"], [_video_message(up["url"], q)]) == _chat_answer(assets, assets["video"], q)
  examples = httpx.get(server["url"] + "/v1/examples").json()["data"]
  assert [e["name"] for e in examples] == ["clip.mp4", "photo.png"]


def test_upload_over_the_limit_is_413_and_leaves_nothing(server, monkeypatch):
  service = server["service"]
  monkeypatch.setattr(service, "options", dataclasses.replace(service.options, max_upload_bytes=1000))
  before = sorted(os.listdir(service.upload_dir))
  # Refused from its declared length before the body is read, and (without one) while the file is copied.
  resp = httpx.post(server["url"] + "/v1/uploads", files={"file": ("big.mp4", b"x" * 100_000, "video/mp4")})
  assert resp.status_code == 413 and "1000 bytes" in resp.json()["error"]["message"]
  monkeypatch.setattr("kangaroo_jax.serve.app.UPLOAD_OVERHEAD", 10**6)
  resp = httpx.post(server["url"] + "/v1/uploads", files={"file": ("big.mp4", b"x" * 3000, "video/mp4")})
  assert resp.status_code == 413 and resp.json()["error"]["code"] == "file_too_large"
  assert sorted(os.listdir(service.upload_dir)) == before
  resp = httpx.post(server["url"] + "/v1/uploads", data={"other": "x"})
  assert resp.status_code == 400 and "'file' field" in resp.json()["error"]["message"]


@pytest.mark.parametrize(
    "content, field, words",
    [
        (
            [{"type": "video_url", "video_url": {"url": "https://example.com/v.mp4"}}],
            "content[0].video_url.url",
            "remote URLs",
        ),
        ([{"type": "video_url", "video_url": {"url": "/no/such/clip.mp4"}}], "video_url.url", "no such file"),
        ([{"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}}], "video_url.url", "video"),
        ([{"type": "video_url", "video_url": {"url": "data:video/mp4;base64,%%%"}}], "video_url.url", "base64"),
        ([{"type": "audio_url", "audio_url": {"url": "x.wav"}}], "content[0]", "content part type"),
    ],
)
def test_bad_media_is_400_naming_the_field(server, content, field, words):
  with pytest.raises(openai.BadRequestError) as e:
    _ask(server["client"], [{"role": "user", "content": content + [{"type": "text", "text": "q"}]}])
  err = e.value.body
  assert field in err["param"] and words in err["message"] and err["type"] == "invalid_request_error"


def test_bad_requests_are_400(assets, server):
  client = server["client"]
  user = {"role": "user", "content": "hi"}
  cases = [
      (dict(temperature=5), "temperature"),
      (dict(max_tokens=0), "max_tokens"),
      (dict(n=2), "n"),
      (dict(stop=["x"]), "stop"),
  ]
  for extra, param in cases:
    with pytest.raises(openai.BadRequestError) as e:
      client.chat.completions.create(model="m", messages=[user], **extra)
    assert e.value.body["param"] == param, extra
  for messages, words in (
      ([], "non-empty"),
      ([{"role": "assistant", "content": "a"}], "last message"),
      (
          [
              user,
              {"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": assets["image"]}}]},
              user,
          ],
          "only user messages",
      ),
      ([user, {"role": "assistant", "content": "a"}, _video_message(assets["video"], "q")], "first user message"),
  ):
    with pytest.raises(openai.BadRequestError, match=words):
      client.chat.completions.create(model="m", messages=messages)
  resp = httpx.post(server["url"] + "/v1/chat/completions", content=b"{not json")
  assert resp.status_code == 400 and "JSON" in resp.json()["error"]["message"]
  assert httpx.get(server["url"] + "/v1/nothing").json()["error"]["message"] == "Not Found"


def test_a_client_that_goes_away_stops_its_decoding(server):
  batcher = server["service"].batcher
  cut, calls = batcher.stats.cut_short, batcher.stats.generate_calls
  body = {
      "model": "m",
      "messages": [{"role": "user", "content": "Talk for a long time."}],
      "stream": True,
      "temperature": 0,
      "max_tokens": 100,
  }
  with httpx.stream("POST", server["url"] + "/v1/chat/completions", json=body, timeout=60) as resp:
    for line in resp.iter_lines():
      if '"content": "' in line and '"content": ""' not in line:
        break  # the first piece of text: the engine call is running
  deadline = time.monotonic() + 60
  while batcher.stats.cut_short == cut:
    assert time.monotonic() < deadline, "the call ran on for a client that had gone"
    time.sleep(0.05)
  assert batcher.stats.generate_calls == calls + 1
  assert _ask(server["client"], [{"role": "user", "content": "Still there?"}])  # the server goes on serving


def test_prompt_too_long_is_413(assets, server):
  with pytest.raises(openai.APIStatusError) as e:
    _ask(server["client"], [_video_message(assets["video"], "kangaroo " * MAX_POSITIONS)])
  assert e.value.status_code == 413
  assert e.value.body["code"] == "context_length_exceeded" and "positions allowed" in e.value.body["message"]


def test_full_queue_is_503(server, monkeypatch):
  """The worker is held inside an engine call; with --max-queue 2, a third waiting request gets 503."""
  service, client = server["service"], server["client"]
  batcher = service.batcher
  monkeypatch.setattr(batcher, "max_queue", 2)
  entered, release = threading.Event(), threading.Event()
  run_group = batcher.run_group

  def held(group):
    entered.set()
    release.wait(60)
    run_group(group)

  monkeypatch.setattr(batcher, "run_group", held)
  answers = []
  ask = lambda q: answers.append(_ask(client, [{"role": "user", "content": q}]))  # noqa: E731
  threads = [threading.Thread(target=ask, args=("first",))]
  threads[0].start()
  assert entered.wait(60)
  threads += [threading.Thread(target=ask, args=(q,)) for q in ("second", "third")]
  for t in threads[1:]:
    t.start()
  deadline = time.monotonic() + 60
  while batcher.pending() < 2:
    assert time.monotonic() < deadline
    time.sleep(0.02)
  try:
    with pytest.raises(openai.APIStatusError) as e:
      _ask(client, [{"role": "user", "content": "fourth"}])
    assert e.value.status_code == 503 and e.value.body["code"] == "overloaded"
  finally:
    release.set()
    for t in threads:
      t.join(120)
  assert len(answers) == 3 and all(isinstance(a, str) for a in answers)


def test_sixteen_concurrent_clients_are_batched_and_answer_as_alone(assets, server):
  client, service = server["client"], server["service"]
  # Prompts of different lengths (rows of a batch are right-padded), with and without the video.
  requests = [[_video_message(assets["video"], "What happens" + " in the end" * (i % 4) + "?")] for i in range(8)] + [
      [{"role": "user", "content": "Tell me" + " more" * i + " about kangaroos."}] for i in range(8)
  ]
  lengths = {
      len(service.chat.tokenizer.encode(m[0]["content"] if i >= 8 else m[0]["content"][1]["text"]))
      for i, m in enumerate(requests)
  }
  assert len(lengths) >= 8
  alone = [_ask(client, m) for m in requests]  # one at a time: each is a batch of one
  before = collections.Counter(service.batcher.stats.batch_sizes)
  barrier = threading.Barrier(len(requests))
  together: dict = {}

  def one(i):
    barrier.wait(30)
    together[i] = _ask(client, requests[i])

  threads = [threading.Thread(target=one, args=(i,)) for i in range(len(requests))]
  start = time.monotonic()
  for t in threads:
    t.start()
  for t in threads:
    t.join(180)
  assert time.monotonic() - start < 180 and len(together) == len(requests)
  assert [together[i] for i in range(len(requests))] == alone
  new_calls = collections.Counter(service.batcher.stats.batch_sizes) - before
  assert max(new_calls) > 1, new_calls  # batching happened
  assert sum(k * v for k, v in new_calls.items()) == len(requests)
  stats = httpx.get(server["url"] + "/v1/stats").json()
  assert stats["max_batch"] > 1 and stats["pending"] == 0


def test_cli_errors_are_one_line_exit_2(assets, capsys, monkeypatch, tmp_path):
  assert serve_cli.main([str(tmp_path / "missing"), "--num-frames", "4"]) == 2
  assert serve_cli.main([assets["ckpt"], "--num-frames", "3"]) == 2
  assert serve_cli.main([assets["ckpt"], "--max-batch", "0"]) == 2
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 3 and all(x.startswith("error: ") for x in lines)
  assert "--num-frames" in lines[1] and "--max-batch" in lines[2]
  real = serve_cli.importlib.util.find_spec
  monkeypatch.setattr(serve_cli.importlib.util, "find_spec", lambda name: None if name == "fastapi" else real(name))
  assert serve_cli.main([assets["ckpt"]]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err == ["error: the server needs fastapi: pip install -e '.[serve]'"]


def test_cli_serves_until_interrupted(assets, tmp_path):
  """The real command: it listens, answers /health and /v1/models, and ends with status 0 on Ctrl-C."""
  port = _free_port()
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  proc = subprocess.Popen(
      [
          sys.executable,
          "-m",
          "kangaroo_jax.serve",
          assets["ckpt"],
          "--port",
          str(port),
          "--num-frames",
          "4",
          "--served-model-name",
          "cli-model",
      ],
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
  )
  try:
    deadline = time.monotonic() + 120
    while True:
      assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else "no start"
      try:
        health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).json()
        break
      except httpx.HTTPError:
        time.sleep(0.2)
    assert health == {"status": "ok", "model": "cli-model", "pending": 0}
    assert httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["data"][0]["id"] == "cli-model"
    assert "Kangaroo video chat" in httpx.get(f"http://127.0.0.1:{port}/").text
  finally:
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
  assert proc.returncode == 0, out
  assert f"serving cli-model on http://127.0.0.1:{port}/" in out
