import json
import re
from pathlib import Path

import yaml
from _data_fixtures import write_prose_jsonl
from _scripts import load_script

from moe_emergence.data import load_corpus

ROOT = Path(__file__).resolve().parents[1]


def test_offline_yaml_matches_default_config():
    from moe_emergence.data import DataConfig, default_offline_config

    raw = yaml.safe_load((ROOT / "configs" / "data" / "offline.yaml").read_text())
    assert DataConfig.from_dict(raw["data"]) == default_offline_config()


def test_prepare_data_writes_splits_and_stats(tmp_path, capsys):
    write_prose_jsonl(tmp_path / "prose.jsonl", 40)
    config = {
        "data": {
            "seq_len": 64,
            "vocab_size": 400,
            "cache_dir": None,
            "root_dir": str(tmp_path),
            "domains": {
                "code": {"type": "stdlib", "paths": ["json/*.py"]},
                "math": {"type": "mathgen", "num_problems": 100},
                "prose": {"type": "files", "paths": ["prose.jsonl"], "text_field": "body"},
            },
        }
    }
    path = tmp_path / "data.yaml"
    path.write_text(yaml.safe_dump(config))
    main = load_script("prepare_data").main
    out = tmp_path / "out"
    assert main(["--config", str(path), "--out", str(out), "seq_len=32", "domains.math.num_problems=60"]) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["seq_len"] == 32 and stats["config"]["domains"]["math"]["num_problems"] == 60
    for split in ("train", "eval"):
        assert set(stats[split]) == {"code", "math", "prose"}
        assert all(
            set(v) == {"documents", "tokens", "blocks"} and v["tokens"] > 0 for v in stats[split].values()
        )
    corpus = load_corpus(out)
    assert len(corpus.train) == stats["total"]["train_blocks"] and len(corpus.train[0]["input_ids"]) == 32
    assert corpus.tokenizer.eos_token_id is not None

    capsys.readouterr()
    assert main(["--config", str(path), "--out", str(tmp_path / "o2"), "seq_lenn=32"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and re.search(
        r"unknown key 'data\.seq_lenn'; did you mean 'seq_len'", err
    )
    assert not (tmp_path / "o2").exists()
