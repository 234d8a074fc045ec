"""Settings, load_settings precedence and errors, redact_url, and config.example.yaml."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from flowcraft_cli.config import Settings, load_settings, redact_url
from flowcraft_cli.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults(tmp_path: Path) -> None:
    s = load_settings(env={}, cwd=str(tmp_path))
    assert s.redis.url == "redis://localhost:6379/0"
    assert s.queue.name == "flowcraft-queue"
    assert s.blueprints == (str(tmp_path / "blueprints"),)
    assert s.registry == ()
    assert s.state.ttl_seconds == 86400
    assert s.state.running_ttl_seconds == 604800
    assert (s.worker.concurrency, s.worker.job_timeout_seconds, s.worker.version_grace_seconds) == (
        10,
        300,
        300,
    )
    assert (s.reconciler.threshold_seconds, s.reconciler.scan_count) == (300, 100)
    assert s.config_file is None


def test_example_config_documents_the_defaults() -> None:
    example = ROOT / "config.example.yaml"
    loaded = load_settings(str(example), env={})
    assert loaded.blueprints == (str(ROOT / "blueprints"),)  # relative to the file's folder
    assert loaded == Settings(blueprints=(str(ROOT / "blueprints"),))
    text = example.read_text()
    for section, key in [
        ("redis", "url"),
        ("queue", "name"),
        ("state", "ttl_seconds"),
        ("state", "running_ttl_seconds"),
        ("worker", "concurrency"),
        ("worker", "job_timeout_seconds"),
        ("worker", "version_grace_seconds"),
        ("reconciler", "threshold_seconds"),
        ("reconciler", "scan_count"),
    ]:
        assert f"\n{section}:" in text and f"  {key}:" in text


def test_precedence_flags_over_env_over_file_over_defaults(tmp_path: Path) -> None:
    write(
        tmp_path / "flowcraft.yaml",
        "redis: {url: 'redis://file:6379/1'}\n"
        "queue: {name: file-queue}\n"
        "worker: {concurrency: 3, job_timeout_seconds: 60}\n"
        "registry: [file.nodes]\n",
    )
    env = {"FLOWCRAFT_REDIS_URL": "redis://env:6379/2", "FLOWCRAFT_QUEUE": "env-queue"}
    s = load_settings(
        env=env, overrides={"queue.name": "flag-queue", "worker.concurrency": None}, cwd=str(tmp_path)
    )
    assert s.queue.name == "flag-queue"  # flag beats env
    assert s.redis.url == "redis://env:6379/2"  # env beats file
    assert s.worker.concurrency == 3  # file beats default
    assert s.worker.job_timeout_seconds == 60
    assert s.worker.version_grace_seconds == 300  # default
    assert s.registry == ("file.nodes",)
    assert s.config_file == str(tmp_path / "flowcraft.yaml")

    s = load_settings(env=env, overrides={"worker.concurrency": 7, "redis.url": None}, cwd=str(tmp_path))
    assert s.worker.concurrency == 7
    assert s.redis.url == "redis://env:6379/2"  # a None override is "flag not given"


def test_config_file_selection(tmp_path: Path) -> None:
    write(tmp_path / "flowcraft.yaml", "queue: {name: from-cwd}\n")
    other = write(tmp_path / "other.yaml", "queue: {name: from-env-var}\n")
    explicit = write(tmp_path / "explicit.yaml", "queue: {name: from-flag}\n")
    assert load_settings(env={}, cwd=str(tmp_path)).queue.name == "from-cwd"
    env = {"FLOWCRAFT_CONFIG": str(other)}
    assert load_settings(env=env, cwd=str(tmp_path)).queue.name == "from-env-var"
    assert load_settings(str(explicit), env=env, cwd=str(tmp_path)).queue.name == "from-flag"


def test_missing_explicit_config_file_is_an_error(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=r"nope\.yaml: config file not found \(named by --config\)"):
        load_settings(missing, env={})
    with pytest.raises(ConfigError, match=r"named by \$FLOWCRAFT_CONFIG"):
        load_settings(env={"FLOWCRAFT_CONFIG": missing})


def test_env_lists(tmp_path: Path) -> None:
    env = {
        "FLOWCRAFT_BLUEPRINTS": os.pathsep.join(["/abs/flows", "rel/flows", ""]),
        "FLOWCRAFT_REGISTRY": "myapp.nodes, other ,",
    }
    s = load_settings(env=env, cwd=str(tmp_path))
    assert s.blueprints == ("/abs/flows", str(tmp_path / "rel" / "flows"))
    assert s.registry == ("myapp.nodes", "other")


def test_relative_blueprint_paths_resolve_against_the_config_file(tmp_path: Path) -> None:
    conf = tmp_path / "conf"
    conf.mkdir()
    write(conf / "flowcraft.yaml", "blueprints: [./flows, /abs/x.yaml]\n")
    s = load_settings(str(conf / "flowcraft.yaml"), env={}, cwd=str(tmp_path))
    assert s.blueprints == (str(conf / "flows"), "/abs/x.yaml")
    single = write(conf / "single.yaml", "blueprints: one.yaml\n")
    assert load_settings(str(single), env={}).blueprints == (str(conf / "one.yaml"),)


def test_unknown_keys_suggest(tmp_path: Path) -> None:
    f = write(tmp_path / "flowcraft.yaml", "worker:\n  concurency: 4\nreconcilr: {}\n")
    with pytest.raises(ConfigError) as info:
        load_settings(str(f), env={})
    lines = str(info.value).splitlines()
    assert lines[0].startswith(f"{f}: worker.concurency: unknown key (did you mean 'concurrency'?)")
    assert lines[1].startswith(f"{f}: reconcilr: unknown key (did you mean 'reconciler'?)")
    with pytest.raises(
        ConfigError,
        match=r"command line: worker\.concurency: unknown setting \(did you mean 'worker\.concurrency'\?\)",
    ):
        load_settings(env={}, overrides={"worker.concurency": 3}, cwd=str(tmp_path))


def test_invalid_values_name_file_and_key(tmp_path: Path) -> None:
    f = write(
        tmp_path / "flowcraft.yaml",
        "worker:\n  concurrency: ten\n  job_timeout_seconds: -1\n  lease_seconds: 0\n"
        "state: {ttl_seconds: -1}\nreconciler: {scan_count: true}\n"
        "redis: {url: 'http://user:secret@host'}\nregistry: [my-app.nodes]\nqueue: []\n",
    )
    with pytest.raises(ConfigError) as info:
        load_settings(str(f), env={})
    lines = str(info.value).splitlines()
    assert f"{f}: worker.concurrency: must be an integer >= 1, got 'ten'" in lines
    assert f"{f}: worker.job_timeout_seconds: must be a number of seconds >= 0, got -1" in lines
    assert f"{f}: worker.lease_seconds: must be a number of seconds > 0, got 0" in lines
    assert f"{f}: state.ttl_seconds: must be an integer >= 0 (0 = forever), got -1" in lines
    assert f"{f}: reconciler.scan_count: must be an integer >= 1, got True" in lines
    assert (
        f"{f}: redis.url: must be a redis://, rediss:// or unix:// URL, got 'http://user:***@host'" in lines
    )
    assert any(
        line.startswith(f"{f}: registry: must be a list of module names; 'my-app.nodes'") for line in lines
    )
    assert any(line.startswith(f"{f}: queue: must be a mapping") for line in lines)
    assert "secret" not in str(info.value)


def test_env_and_flag_errors_name_their_origin(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^\$FLOWCRAFT_REDIS_URL: redis\.url: must be a redis://"):
        load_settings(env={"FLOWCRAFT_REDIS_URL": "localhost:6379"}, cwd=str(tmp_path))
    with pytest.raises(
        ConfigError, match=r"^command line: worker\.concurrency: must be an integer >= 1, got 0"
    ):
        load_settings(env={}, overrides={"worker.concurrency": 0}, cwd=str(tmp_path))
    s = load_settings(env={}, overrides={"worker.concurrency": "4"}, cwd=str(tmp_path))
    assert s.worker.concurrency == 4


def test_malformed_and_duplicate_yaml_config(tmp_path: Path) -> None:
    f = write(tmp_path / "flowcraft.yaml", "worker:\n  concurrency: 1\n  concurrency: 2\n")
    with pytest.raises(ConfigError, match=r"flowcraft\.yaml: line 3: duplicate key 'concurrency'"):
        load_settings(str(f), env={})
    write(f, "worker: [\n")
    with pytest.raises(ConfigError, match=r"flowcraft\.yaml: line 2: "):
        load_settings(str(f), env={})
    write(f, "")
    assert load_settings(str(f), env={}, cwd=str(tmp_path)).queue.name == "flowcraft-queue"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://:secret@localhost:6379/0", "redis://:***@localhost:6379/0"),
        ("redis://user:secret@host:6379/0", "redis://user:***@host:6379/0"),
        ("rediss://default:p@ss:w0rd@host", "rediss://default:***@host"),
        ("redis://localhost:6379/0", "redis://localhost:6379/0"),
        ("redis://user@host", "redis://user@host"),
        ("unix:///tmp/redis.sock?db=0&password=secret", "unix:///tmp/redis.sock?db=0&password=***"),
        ("not a url", "not a url"),
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected


def test_to_dict_redacts() -> None:
    s = Settings()
    d = Settings(redis=type(s.redis)(url="redis://:pw@h:1/0")).to_dict()
    assert d["redis"]["url"] == "redis://:***@h:1/0"
    assert d["worker"]["concurrency"] == 10
    assert set(d) == {"redis", "queue", "blueprints", "registry", "state", "worker", "reconciler"}
