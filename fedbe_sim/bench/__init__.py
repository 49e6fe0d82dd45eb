"""``fedbe bench``: FedBE against federated LoRA baselines and full fine-tuning, on identical splits, seeds
and budgets.

Every method runs the same emulated federation in one process (the same clients, rounds, local steps
and evaluation after every round: BBC News accuracy and the general-ability probes of
:mod:`fedbe.general_ability`), with the production algorithms and without the transport (``fedbe simulate``
runs the real processes over MQTT). FedBE's round is :func:`coordinator.round.plan_round` and
:func:`coordinator.round.close_round`, the functions the coordinator daemon runs; FedBE's methods are
settings of it (:data:`METHODS`).

Modules: ``settings`` (:class:`BenchSettings`), ``method_table`` (:data:`METHODS`), ``world`` (the
:class:`Federation` and its evaluation), ``methods``, ``runner``, ``stats``, ``report``, ``records``
(settings digests, merging runs) and ``cli``.
"""

from fedbe_sim.bench.cli import add_bench_parser, add_merge_parser, settings_from_args
from fedbe_sim.bench.method_table import METHODS, MethodSpec
from fedbe_sim.bench.methods import BlockMethod, FullMethod, LoraMethod, Method, cast_plain_base, make_method
from fedbe_sim.bench.records import (
    PINNED_FOR_BASELINES,
    digested_settings,
    load_run,
    merge_bench,
    merge_runs,
    settings_digest,
    settings_from_dict,
)
from fedbe_sim.bench.report import paired_markdown, plot_results, results_markdown, write_results
from fedbe_sim.bench.runner import (
    add_diagnosis_arguments,
    diagnosis_run,
    previous_records,
    run_bench,
    run_bench_jobs,
    run_method,
)
from fedbe_sim.bench.settings import (
    ALL_METHODS,
    BLOCK_METHODS,
    DEFAULT_METHODS,
    LORA_METHODS,
    POSITION_METHODS,
    BenchSettings,
    method_placement,
    quick,
)
from fedbe_sim.bench.stats import mean_curves, paired_differences, position_risks, summarise, t_975
from fedbe_sim.bench.world import (
    Federation,
    build_federation,
    evaluate,
    evaluate_against,
    measure_capacities,
    resolve_profile,  # fedbe.device_profile's, as the bench resolves --profiles
)

__all__ = [
    "ALL_METHODS", "BLOCK_METHODS", "DEFAULT_METHODS", "LORA_METHODS", "METHODS", "PINNED_FOR_BASELINES",
    "POSITION_METHODS", "BenchSettings", "BlockMethod", "Federation", "FullMethod", "LoraMethod", "Method",
    "MethodSpec", "add_bench_parser", "add_diagnosis_arguments", "add_merge_parser", "build_federation",
    "cast_plain_base", "diagnosis_run", "digested_settings", "evaluate", "evaluate_against", "load_run",
    "make_method", "mean_curves", "measure_capacities", "merge_bench", "merge_runs", "method_placement",
    "paired_differences", "paired_markdown", "plot_results", "position_risks", "previous_records", "quick",
    "resolve_profile", "results_markdown", "run_bench", "run_bench_jobs", "run_method", "settings_digest",
    "settings_from_args", "settings_from_dict", "summarise", "t_975", "write_results",
]  # fmt: skip
