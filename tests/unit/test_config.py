"""The configuration loader: TOML file ← ``KSHIPRA_*`` environment ← command-line overrides.

Every call passes an explicit ``environ`` so the real environment never leaks in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cdn_config import SAMPLE_CONFIG, ConfigError, KshipraConfig, load_config, parse_byte_size

MiB = 1024**2
GiB = 1024**3


def write_toml(tmp_path: Path, text: str, name: str = "kshipra.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def load_error(
    tmp_path: Path,
    toml: str | None,
    environ: dict[str, str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> str:
    path = write_toml(tmp_path, toml) if toml is not None else None
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ=environ or {}, overrides=overrides)
    return str(caught.value)


# ---- the shipped sample ---------------------------------------------------------------------


def test_sample_config_describes_one_origin_a_shield_and_three_city_edges() -> None:
    config = load_config(SAMPLE_CONFIG, environ={})

    assert config.origin.listen == "127.0.0.1:8080"
    assert config.origin.base_url == "http://127.0.0.1:8080"
    assert config.origin.upload_limits.lecture_bytes == 8 * GiB
    assert config.origin.upload_limits.image_bytes == 64 * MiB
    assert config.redis.url == "embedded"

    shield = config.edge("mumbai-shield")
    assert shield.upstream == "origin"
    assert shield.memory_bytes == GiB
    assert shield.disk_bytes == 200 * GiB
    cities = [edge for edge in config.edges if edge.name != "mumbai-shield"]
    assert {edge.name for edge in cities} == {"indore", "patna", "jaipur"}
    assert {edge.upstream for edge in cities} == {"mumbai-shield"}
    assert len({edge.listen for edge in config.edges} | {config.origin.listen}) == 5

    assert [rule.pattern for rule in config.cache_rules] == [
        "/content/**/latest*",
        "/content/**/*.m3u8",
        "/content/**/*.json",
    ]
    assert config.cache_rules[2].tags == ("question-bank",)
    assert config.secrets.upload_token is None


def test_unknown_edge_name_is_a_key_error() -> None:
    config = load_config(SAMPLE_CONFIG, environ={})
    with pytest.raises(KeyError):
        config.edge("delhi")


def test_no_file_gives_working_defaults() -> None:
    config = load_config(None, environ={})
    assert config == KshipraConfig()
    assert config.origin.listen == "127.0.0.1:8080"
    assert config.edges == ()
    assert config.log_level == "info"
    assert [rule.pattern for rule in config.cache_rules] == [
        "/content/**/latest*",
        "/content/**/*.m3u8",
        "/content/**/*.json",
    ]


# ---- environment overlay and precedence -----------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "read", "expected"),
    [
        pytest.param(
            {"KSHIPRA_ORIGIN__LISTEN": "0.0.0.0:9000"},
            lambda c: c.origin.listen,
            "0.0.0.0:9000",
            id="origin-listen",
        ),
        pytest.param(
            {"KSHIPRA_ORIGIN__UPLOAD_LIMITS__IMAGE_BYTES": "16MiB"},
            lambda c: c.origin.upload_limits.image_bytes,
            16 * MiB,
            id="nested-byte-size",
        ),
        pytest.param(
            {"KSHIPRA_ORIGIN__UPLOAD_LIMITS__IMAGE_BYTES": "16MiB"},
            lambda c: c.origin.upload_limits.lecture_bytes,
            8 * GiB,
            id="sibling-keeps-default",
        ),
        pytest.param(
            {"KSHIPRA_REDIS__URL": "redis://127.0.0.1:6379/0"},
            lambda c: c.redis.url,
            "redis://127.0.0.1:6379/0",
            id="redis-url",
        ),
        pytest.param(
            {"KSHIPRA_ORIGIN__STORAGE": "s3://kshipra-content"},
            lambda c: c.origin.storage,
            "s3://kshipra-content",
            id="s3-storage",
        ),
        pytest.param(
            {"KSHIPRA_ORIGIN__UPLOAD_SESSION_TTL_S": "3600"},
            lambda c: c.origin.upload_session_ttl_s,
            3600,
            id="string-to-int",
        ),
        pytest.param(
            {"KSHIPRA_ORIGIN_URL": "http://not-a-config-key", "PATH": "/usr/bin"},
            lambda c: c,
            KshipraConfig(),
            id="unrelated-variables-ignored",
        ),
    ],
)
def test_environment_overlays_defaults(environ: dict[str, str], read: Any, expected: Any) -> None:
    assert read(load_config(None, environ=environ)) == expected


def test_environment_overlays_file_and_keeps_sibling_keys(tmp_path: Path) -> None:
    path = write_toml(
        tmp_path,
        """
        [origin]
        listen = "127.0.0.1:7000"
        [origin.upload_limits]
        lecture_bytes = "1GiB"
        image_bytes = "2MiB"
        """,
    )
    config = load_config(
        path,
        environ={
            "KSHIPRA_ORIGIN__LISTEN": "127.0.0.1:7001",
            "KSHIPRA_ORIGIN__UPLOAD_LIMITS__IMAGE_BYTES": "16MiB",
        },
    )
    assert config.origin.listen == "127.0.0.1:7001"
    assert config.origin.upload_limits.image_bytes == 16 * MiB
    assert config.origin.upload_limits.lecture_bytes == GiB


@pytest.mark.parametrize(
    ("environ", "overrides", "expected"),
    [
        ({}, None, "127.0.0.1:7000"),
        ({"KSHIPRA_ORIGIN__LISTEN": "127.0.0.1:7001"}, None, "127.0.0.1:7001"),
        (
            {"KSHIPRA_ORIGIN__LISTEN": "127.0.0.1:7001"},
            {"origin": {"listen": "127.0.0.1:7002"}},
            "127.0.0.1:7002",
        ),
        (
            {"KSHIPRA_ORIGIN__LISTEN": "127.0.0.1:7001"},
            {"origin": {"listen": None}},
            "127.0.0.1:7001",
        ),
        ({}, {"origin": {"listen": "127.0.0.1:7002"}}, "127.0.0.1:7002"),
    ],
    ids=["file", "env-beats-file", "cli-beats-env", "unset-cli-option-ignored", "cli-beats-file"],
)
def test_file_then_environment_then_command_line(
    tmp_path: Path, environ: dict[str, str], overrides: dict[str, Any] | None, expected: str
) -> None:
    path = write_toml(tmp_path, '[origin]\nlisten = "127.0.0.1:7000"\n')
    assert load_config(path, environ=environ, overrides=overrides).origin.listen == expected


# ---- byte sizes -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("64MiB", 64 * MiB),
        ("2GB", 2_000_000_000),
        ("2 GB", 2_000_000_000),
        ("8GiB", 8 * GiB),
        ("512KiB", 512 * 1024),
        ("512kb", 512_000),
        ("1.5GiB", 3 * GiB // 2),
        ("10B", 10),
        ("100", 100),
        (1048576, 1048576),
        (0, 0),
    ],
)
def test_byte_sizes_parse(value: object, expected: int) -> None:
    assert parse_byte_size(value) == expected


@pytest.mark.parametrize("value", ["lots", "", "-1", "12 parsecs", "MiB", "1e6", True, None])
def test_bad_byte_sizes_are_refused(value: object) -> None:
    with pytest.raises(ValueError, match="byte size"):
        parse_byte_size(value)


@pytest.mark.parametrize(
    ("toml_value", "expected"),
    [('"64MiB"', 64 * MiB), ('"2GB"', 2_000_000_000), ("1048576", 1048576)],
)
def test_byte_sizes_in_a_file(tmp_path: Path, toml_value: str, expected: int) -> None:
    path = write_toml(tmp_path, f"[origin.upload_limits]\nimage_bytes = {toml_value}\n")
    assert load_config(path, environ={}).origin.upload_limits.image_bytes == expected


# ---- bad values name the key and the reason -------------------------------------------------

EDGE = '[[edges]]\nname = "{name}"\ncity = "X"\nlisten = "{listen}"\nupstream = "{upstream}"\n'


def edge(name: str, listen: str, upstream: str = "origin") -> str:
    return EDGE.format(name=name, listen=listen, upstream=upstream)


@pytest.mark.parametrize(
    ("toml", "environ", "key", "reason"),
    [
        pytest.param(
            "",
            {"KSHIPRA_ORIGIN__LISTEN": "nope"},
            "origin.listen",
            "HOST:PORT",
            id="listen-no-port",
        ),
        pytest.param(
            "",
            {"KSHIPRA_ORIGIN__LISTEN": "127.0.0.1:99999"},
            "origin.listen",
            "0-65535",
            id="listen-port-range",
        ),
        pytest.param(
            "",
            {"KSHIPRA_ORIGIN__LISTEN": "bad host!:80"},
            "origin.listen",
            "not a host",
            id="listen-bad-host",
        ),
        pytest.param(
            "",
            {"KSHIPRA_ORIGIN__UPLOAD_LIMITS__IMAGE_BYTES": "lots"},
            "origin.upload_limits.image_bytes",
            "not a byte size",
            id="byte-size-lots",
        ),
        pytest.param(
            "",
            {"KSHIPRA_ORIGIN__UPLOAD_LIMITS__IMAGE_BYTES": "0"},
            "origin.upload_limits.image_bytes",
            "greater than 0",
            id="byte-size-zero",
        ),
        pytest.param(
            "",
            {"KSHIPRA_REDIS__URL": "http://cache:6379"},
            "redis.url",
            "redis://",
            id="redis-scheme",
        ),
        pytest.param(
            "",
            {"KSHIPRA_ORIGIN__STORAGE": "https://example.com/bucket"},
            "origin.storage",
            "s3://BUCKET",
            id="storage-scheme",
        ),
        pytest.param(
            "",
            {"KSHIPRA_ORIGIN__UPLOAD_SESSION_TTL_S": "soon"},
            "origin.upload_session_ttl_s",
            "integer",
            id="ttl-not-int",
        ),
        pytest.param(edge("indore", "bad"), {}, "edges[0].listen", "HOST:PORT", id="edge-listen"),
        pytest.param(
            edge("mumbai", "127.0.0.1:8101") + edge("Patna City", "127.0.0.1:8102", "mumbai"),
            {},
            "edges[1].name",
            "lowercase",
            id="edge-name",
        ),
        pytest.param(
            edge("indore", "127.0.0.1:8101") + 'memory_bytes = "lots"\n',
            {},
            "edges[0].memory_bytes",
            "not a byte size",
            id="edge-memory",
        ),
        pytest.param(
            '[[edges]]\nname = "indore"\nlisten = "127.0.0.1:8101"\n',
            {},
            "edges[0].city",
            "required",
            id="edge-missing-city",
        ),
        pytest.param(
            '[[cache_rules]]\npattern = "content/*.json"\nedge_ttl_s = 1\nbrowser_ttl_s = 1\n',
            {},
            "cache_rules[0].pattern",
            "start",
            id="rule-relative-pattern",
        ),
        pytest.param(
            '[[cache_rules]]\npattern = "/x"\nedge_ttl_s = -1\nbrowser_ttl_s = 1\n',
            {},
            "cache_rules[0].edge_ttl_s",
            "greater than or equal to 0",
            id="rule-negative-ttl",
        ),
        pytest.param('log_level = "loud"\n', {}, "log_level", "'debug'", id="log-level"),
    ],
)
def test_bad_value_names_key_and_reason(
    tmp_path: Path, toml: str, environ: dict[str, str], key: str, reason: str
) -> None:
    message = load_error(tmp_path, toml, environ)
    assert f"{key}:" in message
    assert reason in message
    for variable in environ:
        assert variable in message, "the message says where the bad value came from"


@pytest.mark.parametrize(
    ("typo_toml", "key"),
    [
        ('[origin]\nlissten = "127.0.0.1:8080"\n', "origin.lissten"),
        ('[orgin]\nlisten = "127.0.0.1:8080"\n', "orgin"),
        (edge("indore", "127.0.0.1:8101") + "memory_byte = 1\n", "edges[0].memory_byte"),
        ('[origin.upload_limits]\nvideo_bytes = "1GiB"\n', "origin.upload_limits.video_bytes"),
    ],
)
def test_unknown_keys_are_refused(tmp_path: Path, typo_toml: str, key: str) -> None:
    message = load_error(tmp_path, typo_toml)
    assert f"{key}:" in message
    assert "not permitted" in message


@pytest.mark.parametrize(
    ("storage", "ok"),
    [
        ("s3://good-bucket", True),
        ("s3://good-bucket/prefix/path", True),
        ("s3://kshipra.content-2024", True),
        ("./data", True),
        ("/var/lib/kshipra", True),
        ("s3://Bad_Bucket", False),
        ("s3://UPPER", False),
        ("s3://ab", False),
        ("s3://-leading-dash", False),
        ("s3://", False),
    ],
)
def test_storage_location(tmp_path: Path, storage: str, ok: bool) -> None:
    toml = f'[origin]\nstorage = "{storage}"\n'
    if ok:
        config = load_config(write_toml(tmp_path, toml), environ={})
        assert config.origin.storage == storage
    else:
        message = load_error(tmp_path, toml)
        assert "origin.storage:" in message
        assert "bucket" in message


# ---- files ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        '[origin\nlisten = "127.0.0.1:8080"\n',
        "[origin]\nlisten = 127.0.0.1:8080\n",
        '[origin]\nlisten = "a"\nlisten = "b"\n',
    ],
    ids=["unclosed-table", "unquoted-string", "duplicate-key"],
)
def test_invalid_toml_is_a_config_error(tmp_path: Path, text: str) -> None:
    message = load_error(tmp_path, text)
    assert "not valid TOML" in message
    assert "kshipra.toml" in message


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.toml"
    with pytest.raises(ConfigError, match="not found") as caught:
        load_config(missing, environ={})
    assert str(missing) in str(caught.value)


# ---- secrets --------------------------------------------------------------------------------

GOOD_SECRETS = {
    "KSHIPRA_UPLOAD_TOKEN": "upload-0123456789abcdef",
    "KSHIPRA_PURGE_TOKEN": "purge-0123456789abcdef",
    "KSHIPRA_SIGNING_KEY": "signing-0123456789abcdef0123456789abcdef",
}


def test_secrets_table_in_a_file_is_refused(tmp_path: Path) -> None:
    message = load_error(tmp_path, '[secrets]\nupload_token = "file-token-0123456789abcdef"\n')
    assert "environment" in message
    assert "KSHIPRA_UPLOAD_TOKEN" in message
    assert "file-token-0123456789abcdef" not in message


@pytest.mark.parametrize(
    ("variable", "field"),
    [
        ("KSHIPRA_UPLOAD_TOKEN", "upload_token"),
        ("KSHIPRA_PURGE_TOKEN", "purge_token"),
        ("KSHIPRA_SIGNING_KEY", "signing_key"),
    ],
)
def test_secrets_come_from_their_variables(variable: str, field: str) -> None:
    config = load_config(None, environ={variable: GOOD_SECRETS[variable]})
    assert getattr(config.secrets, field) == GOOD_SECRETS[variable]
    others = {"upload_token", "purge_token", "signing_key"} - {field}
    assert all(getattr(config.secrets, other) is None for other in others)


def test_empty_secret_variable_counts_as_unset() -> None:
    config = load_config(None, environ={"KSHIPRA_UPLOAD_TOKEN": ""})
    assert config.secrets.upload_token is None


@pytest.mark.parametrize(
    ("variable", "short_value", "minimum"),
    [
        ("KSHIPRA_UPLOAD_TOKEN", "hunter2-short", 16),
        ("KSHIPRA_PURGE_TOKEN", "purge-me-now", 16),
        ("KSHIPRA_SIGNING_KEY", "sixteen-chars-but-not-32-x", 32),
    ],
)
def test_too_short_secret_names_the_variable_not_the_value(
    variable: str, short_value: str, minimum: int
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(None, environ={variable: short_value})
    message = str(caught.value)
    assert variable in message
    assert f"at least {minimum} characters" in message
    assert short_value not in message


def test_secret_values_never_appear_in_repr_or_str() -> None:
    config = load_config(SAMPLE_CONFIG, environ=GOOD_SECRETS)
    assert config.secrets.upload_token == GOOD_SECRETS["KSHIPRA_UPLOAD_TOKEN"]
    for rendered in (repr(config), str(config), repr(config.secrets), str(config.secrets)):
        for value in GOOD_SECRETS.values():
            assert value not in rendered


# ---- edge topology --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("edges", "fragments"),
    [
        pytest.param(
            edge("indore", "127.0.0.1:8101") + edge("indore", "127.0.0.1:8102"),
            ["duplicate names", "indore"],
            id="duplicate-names",
        ),
        pytest.param(
            edge("indore", "127.0.0.1:8101", upstream="mumbai-shield"),
            ["edges.indore.upstream", "mumbai-shield"],
            id="unknown-upstream",
        ),
        pytest.param(
            edge("a", "127.0.0.1:8101", "b") + edge("b", "127.0.0.1:8102", "a"),
            ["upstream cycle", "a -> b -> a"],
            id="two-edge-cycle",
        ),
        pytest.param(
            edge("a", "127.0.0.1:8101", "a"),
            ["upstream cycle", "a -> a"],
            id="self-upstream",
        ),
        pytest.param(
            edge("shield", "127.0.0.1:8100")
            + edge("a", "127.0.0.1:8101", "c")
            + edge("b", "127.0.0.1:8102", "a")
            + edge("c", "127.0.0.1:8103", "b"),
            ["upstream cycle"],
            id="three-edge-cycle",
        ),
        pytest.param(
            edge("indore", "127.0.0.1:8101") + edge("patna", "127.0.0.1:8101"),
            ["same address", "127.0.0.1:8101"],
            id="two-edges-same-listen",
        ),
        pytest.param(
            edge("indore", "127.0.0.1:8080"),
            ["same address", "127.0.0.1:8080"],
            id="edge-on-origin-listen",
        ),
    ],
)
def test_bad_topology_is_refused(tmp_path: Path, edges: str, fragments: list[str]) -> None:
    message = load_error(tmp_path, edges)
    for fragment in fragments:
        assert fragment in message


def test_ephemeral_port_zero_may_be_shared(tmp_path: Path) -> None:
    path = write_toml(
        tmp_path,
        '[origin]\nlisten = "127.0.0.1:0"\n'
        + edge("shield", "127.0.0.1:0")
        + edge("indore", "127.0.0.1:0", "shield"),
    )
    config = load_config(path, environ={})
    assert [e.upstream for e in config.edges] == ["origin", "shield"]


def test_chain_of_shields_is_accepted(tmp_path: Path) -> None:
    path = write_toml(
        tmp_path,
        edge("mumbai-shield", "127.0.0.1:8101")
        + edge("bhopal", "127.0.0.1:8102", "mumbai-shield")
        + edge("indore", "[::1]:8103", "bhopal"),
    )
    config = load_config(path, environ={})
    assert config.edge("indore").upstream == "bhopal"
    assert config.edge("bhopal").upstream == "mumbai-shield"


def test_log_level_comes_from_the_environment() -> None:
    config = load_config(None, environ={"KSHIPRA_LOG_LEVEL": "debug"})
    assert config.log_level == "debug"
    with pytest.raises(ConfigError, match="log_level"):
        load_config(None, environ={"KSHIPRA_LOG_LEVEL": "chatty"})


def test_edges_from_the_environment_are_refused_clearly() -> None:
    with pytest.raises(ConfigError, match="edges are configured in the TOML file"):
        load_config(None, environ={"KSHIPRA_EDGES__0__LISTEN": "127.0.0.1:9000"})


def test_nested_command_line_overrides_merge_into_the_file(tmp_path: Path) -> None:
    path = tmp_path / "k.toml"
    path.write_text('[origin.upload_limits]\nimage_bytes = "2MiB"\nbundle_bytes = "1MiB"\n')
    config = load_config(
        path, environ={}, overrides={"origin": {"upload_limits": {"image_bytes": "3MiB"}}}
    )
    assert config.origin.upload_limits.image_bytes == 3 * 1024 * 1024
    assert config.origin.upload_limits.bundle_bytes == 1024 * 1024
