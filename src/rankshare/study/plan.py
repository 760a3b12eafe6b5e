"""What the evidence study trains: the claims, the models and data, the sizes, and how many runs.

A *part* is one model on one dataset; a *variant* is one method with its options, or a baseline (no adapter:
the head alone, every weight, or the model as it is). Each variant trains at its ranks (a sweep) or at the rank
whose parameter count comes closest to a budget. Its learning rate is the one of its grid whose validation score,
averaged over the search seeds (seed 0 unless said), is best at its ``search_rank``; then every rank trains with
every seed at that rate. A part with ``search_seeds`` = its seeds is a full grid: every rate with every seed, the
runs paired by seed. A part with ``search_steps`` chooses with shorter runs, recorded apart.

The first study (the parts up to ``lotr-minilm-sentiment-lower-rate``) took 87 minutes on a 2-core CPU; the
powered study (issue 20's parts) takes many CPU hours and runs part by part across sittings.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from ..config import methods


@dataclass
class Variant:
    name: str
    label: str
    method: str
    ranks: tuple[int, ...] = ()
    budget: int | None = None  # instead of ranks: the one rank whose count comes closest to this
    search_rank: int | None = None  # where the learning rate is chosen; default: the middle rank
    lr_from: str | None = None  # reuse the rate chosen for another variant of the part
    options: dict = field(default_factory=dict)  # the method's own options (its config's fields)
    learning_rates: tuple[float, ...] = ()  # its own grid instead of the part's
    search_seeds: tuple[int, ...] | None = None  # the seeds whose mean validation accuracy chooses its rate
    basis_data: str | None = None  # cores only, on the factors of a LoTR run trained (seed 0) on this data
    basis_lr: float | None = None  # that run's learning rate


@dataclass
class Part:
    name: str
    claim: str  # "parameter-efficiency" (LoTR's claim) or "multi-task" (MoR's, at a matched budget)
    model: str
    data: str
    max_train: int
    max_eval: int
    max_length: int
    batch_size: int
    learning_rates: tuple[float, ...]
    seeds: tuple[int, ...]
    variants: list[Variant]
    merge_seeds: tuple[int, ...] = ()  # runs of these seeds that merge without gates are also evaluated merged
    steps: int | None = None  # optimisation steps per run (default: one epoch of max_train)
    search_seeds: tuple[int, ...] = (0,)  # the seeds that choose a rate (the mean of their validation accuracy)
    search_steps: int | None = None  # shorter rate-search runs, recorded apart in <part>/search/
    forgetting: int = 0  # held-out news articles on which each run's language-modelling loss is compared with the base
    eval_batch_size: int | None = None  # default: batch_size (generating answers goes faster in larger batches)
    rates_from: str | None = None  # no search: each variant trains at the rate that part chose for its namesake


def lotr_variants(lora: tuple[int, ...], by_name: tuple[int, ...], frozen: tuple[int, ...],
                  by_shape: tuple[int, ...] = ()) -> list[Variant]:
    variants = [
        Variant("lora", "LoRA (PEFT)", "lora", lora),
        Variant("lotr", "LoTR, U and V per projection", "lotr", by_name, options={"share": "by_name"}),
    ]
    if by_shape:
        variants.append(Variant("lotr-by-shape", "LoTR, U and V per shape", "lotr", by_shape,
                                options={"share": "by_shape"}))
    variants.append(Variant("lotr-frozen", "LoTR, Tucker-initialised U and V frozen", "lotr", frozen,
                            options={"init": "tucker", "freeze_factors": True}))
    return variants


def mixture_variants(budget: int, experts: tuple[int, ...], search_experts: int) -> list[Variant]:
    variants = [Variant("lora", "LoRA (PEFT)", "lora", budget=budget)]
    for method in ("mor", "moelora"):
        label = methods()[method].title
        for n in experts:
            lr_from = None if n == search_experts else f"{method}-n{search_experts}"
            variants.append(Variant(f"{method}-n{n}", f"{label}, N={n}", method, budget=budget, lr_from=lr_from,
                                    options={"num_experts": n}))
    return variants


# MiniLM's targets are 12 projections of 384 × 384 (query and value of 6 layers). LoRA rank r has 9,216 r
# parameters; LoTR's ranks are picked so that its curve spans LoRA's range of counts.
MINILM_LOTR = lotr_variants(lora=(1, 4, 16), by_name=(8, 24, 64), by_shape=(8, 32, 96), frozen=(16, 64, 128))
# SmolLM2's query (576 × 576) and value (192 × 576) projections differ in shape, so sharing by shape groups
# them exactly as sharing by name does: that variant would repeat the by-name runs.
SMOLLM2_LOTR = lotr_variants(lora=(1, 4), by_name=(16, 48), frozen=(32, 64))
for _variant in SMOLLM2_LOTR:
    _variant.search_rank = _variant.ranks[0]

SEEDS = (0, 1, 2)
MINILM_RATES = (3e-3, 1e-2, 3e-2)
# 110,592 = LoRA at rank 12 on MiniLM's query and value projections.
MIXTURE_BUDGET = 110_592


def full_plan() -> list[Part]:
    minilm = {"model": "minilm", "max_train": 960, "max_length": 48, "batch_size": 16,
              "learning_rates": MINILM_RATES, "seeds": SEEDS}
    return [
        Part("lotr-minilm-news", "parameter-efficiency", data="news", max_eval=200, variants=MINILM_LOTR,
             merge_seeds=SEEDS, **minilm),
        Part("lotr-minilm-sentiment", "parameter-efficiency", data="sentiment", max_eval=500, variants=MINILM_LOTR,
             merge_seeds=SEEDS, **minilm),
        Part("mor-minilm-news+sentiment", "multi-task", data="news+sentiment", max_eval=200,
             variants=mixture_variants(MIXTURE_BUDGET, (2, 4, 8), search_experts=4), **minilm),
        Part("lotr-smollm2-sentiment", "parameter-efficiency", model="smollm2", data="sentiment", max_train=384,
             max_eval=150, max_length=48, batch_size=8, learning_rates=(1e-3, 3e-3, 1e-2), seeds=SEEDS,
             variants=SMOLLM2_LOTR, merge_seeds=(0,)),
        # Added after the first full run: with trainable U and V, 3 of 9 runs at ranks >= 32 on sentiment fell to
        # the majority class at the rate chosen at the middle rank (1e-2). The same runs at 3e-3:
        Part("lotr-minilm-sentiment-lower-rate", "parameter-efficiency", data="sentiment", max_eval=500, merge_seeds=(),
             variants=[Variant("lotr", "LoTR, U and V per projection", "lotr", (64,), options={"share": "by_name"}),
                       Variant("lotr-by-shape", "LoTR, U and V per shape", "lotr", (32, 96), search_rank=32,
                               options={"share": "by_shape"})],
             **{**minilm, "learning_rates": (3e-3,)}),
        power_part(),
        schedule_part(),
        deep_part(),
        shallow_part(),
        shallow_lower_rate_part(),
        downstream_part("news", "sentiment"),
        downstream_part("sentiment", "news"),
        downstream_floor_part("news"),
        downstream_higher_rate_part("news", "sentiment"),
        downstream_higher_rate_part("sentiment", "news"),
        multitask_part(),
    ]


# The powered study (issue 20). Baselines are variants whose method is one of these: no adapter.
BASELINES = {"head-only": "only the classification head trains", "full": "every weight trains",
             "zero-shot": "the base model as it is, no training"}
POWER_SEEDS = (0, 1, 2, 3, 4)
POWER_RATES = (1e-3, 3e-3, 1e-2, 3e-2)
# 92,160 = LoRA r = 10 on MiniLM's query and value projections, where every method lands within 1.4 %: LoTR r = 45,
# frozen Tucker LoTR r = 88 (its cores alone), MoR N = 4 r = 6 and MoE-LoRA N = 4 r = 2 (exactly).
POWER_BUDGET = 92_160


def power_part() -> Part:
    """Part 1: every method at every rate and seed at one budget, paired by seed, with the floor and the ceiling.

    480 steps of 16 (4 epochs of 1,920 tweets): docs/results/schedule-pilot shows LoRA within 0.8 validation points of
    its 960-step score there. The baselines choose their rate on seed 0, then train the other seeds at it.
    """
    budget = POWER_BUDGET
    variants = [
        Variant("lora", "LoRA (PEFT)", "lora", budget=budget),
        Variant("lotr", "LoTR, trainable U and V", "lotr", budget=budget, options={"share": "by_name"}),
        Variant("lotr-frozen", "LoTR, frozen Tucker U and V", "lotr", budget=budget,
                options={"init": "tucker", "freeze_factors": True}),
        Variant("mor-n4", "MoR, N=4", "mor", budget=budget, options={"num_experts": 4}),
        Variant("moelora-n4", "MoE-LoRA, N=4", "moelora", budget=budget, options={"num_experts": 4}),
        Variant("head-only", "head only (no adapter)", "head-only", learning_rates=(3e-3, 1e-2, 3e-2, 1e-1),
                search_seeds=(0,)),
        Variant("full", "full fine-tuning", "full", learning_rates=(1e-5, 3e-5, 1e-4, 3e-4), search_seeds=(0,)),
    ]
    return Part("power-minilm-sentiment", "power", model="minilm", data="sentiment", max_train=1920, max_eval=500,
                max_length=48, batch_size=16, learning_rates=POWER_RATES, seeds=POWER_SEEDS, variants=variants,
                steps=480, search_seeds=POWER_SEEDS)


def schedule_part() -> Part:
    """Has part 1's schedule levelled off? Its adapters again at the rates it chose, for twice the steps (960 of 16),
    all five seeds: the difference from the same seeds at 480 steps, and a paired comparison at 960 (begun with seeds
    0 and 1, where MoR gained 2 points on test; five seeds say whether that holds)."""
    part = power_part()
    adapters = [v for v in part.variants if v.method not in BASELINES]
    return Part("power-minilm-sentiment-960-steps", "schedule", model=part.model, data=part.data,
                max_train=part.max_train, max_eval=part.max_eval, max_length=part.max_length,
                batch_size=part.batch_size, learning_rates=(), seeds=POWER_SEEDS, variants=adapters,
                steps=2 * part.steps, rates_from=part.name)


# SmolLM2's query (576 × 576) and value (192 × 576) projections in 30 layers: LoRA r has 57,600 r parameters, LoTR with
# trainable factors 1,920 r + 60 r², frozen Tucker LoTR 60 r² (its cores).
DEEP_RATES = (1e-3, 3e-3, 1e-2)


def deep_part() -> Part:
    """Part 2: LoTR against LoRA r = 1 and 4 on a 30-layer model, 300 steps, 3 seeds, the zero-shot floor.

    LoTR's ranks run from far below LoRA r = 1's count (frozen r = 8: 3,840; trainable r = 8: 19,200) through about
    r = 1's (frozen r = 32: 61,440; trainable r = 16: 46,080) to r = 4's (230,400; frozen r = 64: 245,760, trainable
    r = 48: 230,400). Rates are chosen on validation with 100-step runs at the ranks nearest LoRA r = 1's count.
    """
    variants = [
        Variant("lora", "LoRA (PEFT)", "lora", (1, 4), search_rank=1),
        Variant("lotr", "LoTR, trainable U and V", "lotr", (8, 16, 48), search_rank=16, options={"share": "by_name"}),
        Variant("lotr-frozen", "LoTR, frozen Tucker U and V", "lotr", (8, 32, 64), search_rank=32,
                options={"init": "tucker", "freeze_factors": True}),
        Variant("zero-shot", "SmolLM2 before training", "zero-shot"),
    ]
    return Part("deep-smollm2-sentiment", "parameter-efficiency", model="smollm2", data="sentiment", max_train=2400,
                max_eval=500, max_length=48, batch_size=8, learning_rates=DEEP_RATES, seeds=(0, 1, 2),
                variants=variants, steps=300, search_steps=100, forgetting=64)


def shallow_part() -> Part:
    """Part 2's question on a 6-layer model: LoTR against LoRA r = 1 and 4 on MiniLM at part 1's schedule, 3 seeds.
    Does LoTR's advantage grow from 6 layers to 30? MiniLM's 12 projections are all 384 × 384: LoRA r has 9,216 r
    parameters, LoTR with trainable factors 1,536 r + 12 r², frozen Tucker LoTR 12 r². The ranks span the same range
    as part 2's: trainable r = 2, 6, 20 (3,120; 9,648; 35,520), frozen r = 8, 28, 56 (768; 9,408; 37,632). As in
    part 2, each variant's rate is chosen on validation at its rank nearest LoRA r = 1's count (seed 0, full runs).
    """
    part = power_part()
    variants = [
        Variant("lora", "LoRA (PEFT)", "lora", (1, 4), search_rank=1),
        Variant("lotr", "LoTR, trainable U and V", "lotr", (2, 6, 20), search_rank=6, options={"share": "by_name"}),
        Variant("lotr-frozen", "LoTR, frozen Tucker U and V", "lotr", (8, 28, 56), search_rank=28,
                options={"init": "tucker", "freeze_factors": True}),
    ]
    return replace(part, name="shallow-minilm-sentiment", claim="parameter-efficiency", learning_rates=DEEP_RATES,
                   seeds=(0, 1, 2), search_seeds=(0,), variants=variants)


def shallow_lower_rate_part() -> Part:
    """Added after the shallow part's first seeds: its rate, chosen at each variant's rank nearest LoRA r = 1's count,
    was 1e-2 for all three, and at LoRA r = 4's count it was too high (LoRA r = 4 scored below r = 1 on two seeds, and
    trainable LoTR r = 20 fell to one class on seed 0; part 1's LoRA r = 10 collapsed at 1e-2 on 4 of 5 seeds). The
    same seeds at those counts, at the rate below (3e-3)."""
    part = shallow_part()
    variants = [replace(v, ranks=v.ranks[-1:], search_rank=None) for v in part.variants]
    return replace(part, name="shallow-minilm-sentiment-lower-rate", learning_rates=(3e-3,), variants=variants)


def downstream_part(target: str, source: str) -> Part:
    """Part 3: what one more task costs. Cores alone (12 r² parameters) on a LoTR basis trained on the other task,
    or on the frozen Tucker basis of the pretrained weights, against LoRA r = 1 and a whole LoTR trained on the task.
    Part 1's schedule; rates chosen on validation at seed 0."""
    lotr = {"share": "by_name"}
    variants = [
        Variant("lora", "LoRA r=1 (PEFT)", "lora", (1,)),
        Variant("lotr", "LoTR trained on the task", "lotr", (16,), options=lotr),
        Variant(f"cores-on-{source}", f"cores only, on a LoTR basis trained on {source}", "lotr", (16,), options=lotr,
                basis_data=source, basis_lr=3e-3),
        Variant("cores-on-tucker", "cores only, on the frozen Tucker basis", "lotr", (16,),
                options={"init": "tucker", "freeze_factors": True}),
    ]
    return Part(f"downstream-minilm-{target}", "downstream", model="minilm", data=target, max_train=1920,
                max_eval=500, max_length=48, batch_size=16, learning_rates=(3e-3, 1e-2), seeds=(0, 1, 2),
                variants=variants, steps=480)


def downstream_floor_part(target: str) -> Part:
    """Added after part 3's news runs all scored 96-97 %: how much of that does the head alone reach? The floor of
    the downstream part on ``target``, on its split and schedule (sentiment's is part 1's head-only row)."""
    part = downstream_part(target, "sentiment" if target == "news" else "news")
    head = Variant("head-only", "head only (no adapter)", "head-only", learning_rates=(3e-2, 1e-1, 3e-1))
    return replace(part, name=f"{part.name}-floor", variants=[head])


def downstream_higher_rate_part(target: str, source: str) -> Part:
    """Added after part 3's rate search: LoRA r = 1 and both core-only variants chose 1e-2, the top of the two-rate
    grid, on news and on sentiment, each clearly above 3e-3 on validation. The next rate up (3e-2), seed 0 first: its
    validation score says whether the small adapters were held back by the grid (more seeds where it is). On
    sentiment the frozen Tucker cores gained 4 validation points on seed 0: its check has seeds 1 and 2 too."""
    part = downstream_part(target, source)
    variants = [v for v in part.variants if v.name != "lotr"]  # a whole LoTR chose 3e-3, inside the grid
    seeds = (0, 1, 2) if target == "sentiment" else (0,)
    return replace(part, name=f"{part.name}-higher-rate", learning_rates=(3e-2,), seeds=seeds, variants=variants)


def reference_part(part: Part) -> str | None:
    """The part whose LoRA, at the rate that part chose, is ``part``'s paired reference where its own LoRA is not:
    a check one rate up compares with LoRA at its chosen rate, not with LoRA at the check's rate."""
    return part.name.removesuffix("-higher-rate") if part.name.endswith("-higher-rate") else None


# On SmolLM2's query and value projections: 691,200 = LoRA r = 12, where MoR N = 4 has r = 8 and N = 8 r = 4 (its
# routers and output-side expert vectors take the rest), MoE-LoRA N = 4 r = 2 (-13 %) and N = 8 r = 1 (+7 %).
# 921,600 = LoRA r = 16, where MoR N = 4 has r = 12: the shared rank LoRA has at the first budget.
MULTITASK_BUDGETS = (691_200, 921_600)


def multitask_part() -> Part:
    """Part 4: MoR's multi-task claim on the skills set (8 tasks), at two budgets, 300 steps of 4, 3 seeds.

    Rates are chosen on validation with 60-step runs for LoRA, MoR N = 4 and MoE-LoRA N = 4; N = 8 and the larger
    budget take those rates. 63 validation and test examples per task: 504 in all, 0.2 points of the average each.
    """
    small, large = MULTITASK_BUDGETS
    variants = [Variant("lora", "LoRA (PEFT)", "lora", budget=small)]
    for method in ("mor", "moelora"):
        label = methods()[method].title
        variants += [Variant(f"{method}-n4", f"{label}, N=4", method, budget=small, options={"num_experts": 4}),
                     Variant(f"{method}-n8", f"{label}, N=8", method, budget=small, lr_from=f"{method}-n4",
                             options={"num_experts": 8})]
    variants += [Variant("lora-large", "LoRA (PEFT), larger budget", "lora", budget=large, lr_from="lora"),
                 Variant("mor-n4-large", "MoR, N=4, larger budget", "mor", budget=large, lr_from="mor-n4",
                         options={"num_experts": 4}),
                 Variant("zero-shot", "SmolLM2 before training", "zero-shot")]
    return Part("multitask-smollm2-skills", "multi-task", model="smollm2", data="skills", max_train=150, max_eval=63,
                max_length=128, batch_size=4, learning_rates=DEEP_RATES, seeds=(0, 1, 2), variants=variants,
                steps=300, search_steps=60, forgetting=64, eval_batch_size=16)


# In the quick plan, the variants these parts keep (the others keep all, or as the rules below say).
# SmolLM2's parts keep the fewest: each of its variants loads and scores a 135M model (the test suite runs them).
QUICK_VARIANTS = {"lotr-smollm2-sentiment": ("lotr-frozen",),
                  "deep-smollm2-sentiment": ("lotr-frozen", "zero-shot"),
                  "multitask-smollm2-skills": ("mor-n4", "zero-shot"),
                  # the checks one rate up: their basis variant is the downstream parts' code; no second basis
                  "downstream-minilm-news-higher-rate": ("lora", "cores-on-tucker"),
                  "downstream-minilm-sentiment-higher-rate": ("lora", "cores-on-tucker")}


def quick_plan() -> list[Part]:
    """The same parts and code paths, one seed, one rate, one rank per variant, a few steps and examples."""
    parts = []
    for part in full_plan():
        variants = [Variant(**{**asdict(v), "ranks": v.ranks[:1], "search_rank": None,
                               "learning_rates": v.learning_rates[-1:], "search_seeds": None}) for v in part.variants]
        if part.name in QUICK_VARIANTS:
            variants = [v for v in variants if v.name in QUICK_VARIANTS[part.name]]
        elif part.claim == "multi-task":  # the smallest and largest mixtures
            variants = [v for v in variants if not v.name.endswith("-n4")]
        variants = [Variant(**{**asdict(v), "lr_from": None}) for v in variants]  # each chooses its own rate
        small = part.model == "smollm2"
        instructions = part.data == "skills"  # per task, 8 tasks, and evaluation generates: the fewest
        parts.append(replace(part, max_train=4 if instructions else 16 if small else 64,
                             max_eval=1 if instructions else 12 if small else 40,
                             learning_rates=part.learning_rates[-1:], seeds=(0,), search_seeds=(0,),
                             variants=variants, merge_seeds=(0,),
                             steps=(4 if part.rates_from else 2) if part.steps else None,  # the check: twice
                             search_steps=1 if part.search_steps else None, forgetting=min(part.forgetting, 2)))
    return parts


def part_from_dict(raw: dict) -> Part:
    """A part as read back from plan.json: lists become tuples again, and fields added since take their defaults."""
    def tuples(fields: dict) -> dict:
        return {key: tuple(value) if isinstance(value, list) else value for key, value in fields.items()}

    variants = [Variant(**tuples(variant)) for variant in raw["variants"]]
    return Part(**tuples({key: value for key, value in raw.items() if key != "variants"}), variants=variants)


def rates(part: Part, variant: Variant) -> tuple[float, ...]:
    return tuple(variant.learning_rates) or tuple(part.learning_rates)


def search_seeds(part: Part, variant: Variant) -> tuple[int, ...]:
    return tuple(part.search_seeds if variant.search_seeds is None else variant.search_seeds)


def search_rank(variant: Variant, ranks: list[int]) -> int:
    if variant.search_rank is not None:
        return variant.search_rank
    return ranks[len(ranks) // 2]
