"""Local lm-evaluation-harness tasks over data that ships with Python, for offline evaluation.

``write_local_tasks(folder)`` writes JSONL data files and task YAMLs that point at them (absolute
paths; ``lm_eval --include_path folder`` or ``TaskManager(include_path=folder)`` finds them):

- ``cascade_embedded_rolling``: the embedded corpus's test split (CPython's documentation topics,
  ``data.corpus``), one document per line, scored with ``loglikelihood_rolling`` (word and byte
  perplexity, bits per byte);
- ``cascade_entities_choice``: the HTML-entity relation (``data.relations``), "The HTML entity
  eacute is code point" with four candidate code points, scored with ``loglikelihood``
  (multiple choice, accuracy);
- ``cascade_entities_generate``: the same prompts answered by greedy generation until ".", exact
  match (``generate_until``).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..data.corpus import load_corpus
from ..data.relations import entity_pairs, statement
from ..data.storage import write_text_atomic

TASKS = ("cascade_embedded_rolling", "cascade_entities_choice", "cascade_entities_generate")


def _yaml(task: str, data: Path, body: str) -> str:
    return (
        f"task: {task}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\n"
        f"test_split: test\n{body}"
    )


def _entity_docs() -> list[dict]:
    """One doc per entity: the forward prompt, the answer, and four choices (the answer and the code
    points of the entities 63, 126 and 189 places further in the list), the answer's index varying."""
    pairs = entity_pairs()
    docs = []
    for i, (name, point) in enumerate(pairs):
        prompt, answer = statement(name, point, "forward")
        others = [statement(*pairs[(i + shift) % len(pairs)], "forward")[1] for shift in (63, 126, 189)]
        label = i % 4
        choices = others[:label] + [answer] + others[label:]
        docs.append({"prompt": prompt, "answer": answer.strip().rstrip("."), "choices": choices, "label": label})
    return docs


def write_local_tasks(folder: "Path | str") -> list[Path]:
    """Write the data files and task YAMLs (module docstring) into ``folder``; return the YAML paths."""
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    documents = load_corpus("embedded").splits["test"]
    rolling_data = folder / "embedded_test.jsonl"
    write_text_atomic(rolling_data, "".join(json.dumps({"text": d}) + "\n" for d in documents))
    entities = folder / "html_entities.jsonl"
    write_text_atomic(entities, "".join(json.dumps(d) + "\n" for d in _entity_docs()))
    tasks = {
        "cascade_embedded_rolling": _yaml(
            "cascade_embedded_rolling",
            rolling_data,
            (
                'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
                "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n"
            ),
        ),
        "cascade_entities_choice": _yaml(
            "cascade_entities_choice",
            entities,
            (
                'output_type: multiple_choice\ndoc_to_text: "{{prompt}}"\ndoc_to_choice: "{{choices}}"\n'
                'doc_to_target: "{{label}}"\nmetric_list:\n  - metric: acc\n'
            ),
        ),
        "cascade_entities_generate": _yaml(
            "cascade_entities_generate",
            entities,
            (
                'output_type: generate_until\ndoc_to_text: "{{prompt}}"\ndoc_to_target: "{{answer}}"\n'
                'generation_kwargs:\n  until: ["."]\n  max_gen_toks: 8\n  do_sample: false\n'
                'filter_list:\n  - name: strip\n    filter:\n      - function: regex\n        regex_pattern: "(\\\\d+)"\n'  # noqa: E501
                "      - function: take_first\n"
                "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
            ),
        ),
    }
    paths = []
    for task, text in tasks.items():
        path = folder / f"{task}.yaml"
        write_text_atomic(path, text)
        paths.append(path)
    return paths
