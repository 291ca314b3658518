#!/usr/bin/env bash
# The whole chain on the built-in sample: generate -> convert -> tokenize -> pretrain -> fine-tune
# -> plots -> one HTML report. Creates the environment on first use.
#
#   bash run_all.sh                        # defaults below
#   EVENTS=20000 RUN=runs/big bash run_all.sh
#
# Every setting is an environment variable with its default here. A rerun reuses finished step
# outputs (delete a step's folder, or set OVERWRITE=1, to redo it). A failed step stops the chain
# and names the step and its log.
set -euo pipefail

EVENTS="${EVENTS:-3000}"            # events generated per process of the labelled task
SEED="${SEED:-1}"
PROCESSES="${PROCESSES:-hzz4l zz4l ttbar dy}"  # the labelled task's processes
SIGNAL="${SIGNAL:-hzz4l}"
BACKGROUND="${BACKGROUND:-zz4l,ttbar,dy}"
PRETRAIN_PROCESSES="${PRETRAIN_PROCESSES:-wjets qcd singletop wz vbfh4l whh4l zhh4l tthh4l}"  # unlabelled corpus,
                                    # beside the task's own events: the generic four and the other Higgs production
                                    # modes (what the corpus holds decides what pretraining buys: README.md)
PRETRAIN_EVENTS="${PRETRAIN_EVENTS:-1200}"  # events generated per corpus process
PRETRAIN_EPOCHS="${PRETRAIN_EPOCHS:-10}"  # step3 passes over task and corpus, about 18 s each on 2 cores: 10 bring every
                                    # object type's context gain past 0.2 in every seed, and the 853-label margin
                                    # past +0.05 on every backbone (after 8 the taus' stands at 0.20: README.md)
PRETRAIN_OBJECTIVE="${PRETRAIN_OBJECTIVE:-}"  # step3 --objective; empty: step3's default, latent,event,overlap
                                    # (latent,event: the earlier default, 0.015 higher with 102 labels: README.md)
SEEDS="${SEEDS:-1}"                 # every classifier training is repeated with these seeds (1,2,3: the
                                    # seed spread of every figure, about 3x step4's time: README.md)
RUN="${RUN:-runs/default}"          # output folder of this run
SAMPLE_DIR="${SAMPLE_DIR:-data/raw/${EVENTS}ev_seed${SEED}}"  # generated ROOT files, cached between runs
CORPUS_DIR="${CORPUS_DIR:-data/raw/${PRETRAIN_EVENTS}ev_seed${SEED}}"  # the same for the pretraining corpus
DEVICE="${DEVICE:-auto}"            # auto | cpu | cuda
WORKERS="${WORKERS:-$(nproc 2>/dev/null || echo 2)}"  # processes of step0, step1, the fit and the step4 trainings
OVERWRITE="${OVERWRITE:-0}"
TRACKS_IN_SEQUENCE="${TRACKS_IN_SEQUENCE:-10}"  # leading tracks per event in the token sequence
LABEL_FRACTIONS="${LABEL_FRACTIONS:-0.01,0.1,1}"  # data-efficiency protocol
ARMS="${ARMS:-scratch,finetune,frozen,counts_gbdt,standard_gbdt}"  # step4 arms at 100% of the labels (add
#                                   continuous, the continuous-input transformer: one more training, ~25 s per seed)
FRACTION_ARMS="${FRACTION_ARMS:-scratch,finetune,frozen,counts_gbdt,standard_gbdt}"  # those of ARMS also run below
#                                   100% of the labels
GENERALISATION="${GENERALISATION:-0}"  # 1: also the generalisation protocol, trained against the first background
#                                   only and tested on every background (two more trainings, ~30 s per seed)
TASKS="${TASKS:-binary}"            # binary and/or multiclass (the Higgs production modes; generates them too)
CLASSES="${CLASSES:-ggF=hzz4l;VBF=vbfh4l;VH=whh4l,zhh4l;ttH=tthh4l}"  # the multiclass task's classes
WEIGHTING="${WEIGHTING:-events}"    # events | xsec (cross-section x generator weight / sum of weights)
VARIANTS="${VARIANTS:-flat}"        # model variants judged side by side on the binary task: flat group
                                    # constituent group+constituent (each its own pretraining: README.md)
VARIANT_ARMS="${VARIANT_ARMS:-scratch,finetune}"  # the step4 arms of the variants beyond flat

cd "$(dirname "$0")"
source ./env.sh
for t in $TASKS; do
    if [[ "$t" != binary && "$t" != multiclass ]]; then
        echo "[run_all] error: unknown task '$t' in TASKS (known: binary multiclass)" >&2
        exit 2
    fi
done
class_processes=()  # the multiclass task's processes (generated at EVENTS each, beside PROCESSES)
[[ " $TASKS " == *" multiclass "* ]] && class_processes=($(tr ';,' '  ' <<< "$CLASSES" | tr ' ' '\n' | sed 's/.*=//'))
task_processes="$PROCESSES"
for p in "${class_processes[@]}"; do [[ " $task_processes " == *" $p "* ]] || task_processes+=" $p"; done
for v in $VARIANTS; do
    if [[ ! " flat group constituent group+constituent " == *" $v "* ]]; then
        echo "[run_all] error: unknown variant '$v' in VARIANTS (known: flat group constituent group+constituent)" >&2
        exit 2
    fi
done
known="$(python step0_generate.py --list-processes | cut -d' ' -f1)"
for p in $task_processes $PRETRAIN_PROCESSES; do
    if ! grep -qx "$p" <<< "$known"; then
        echo "[run_all] error: unknown process '$p' (known: $(echo $known))" >&2
        exit 2
    fi
done
mkdir -p "$RUN/logs" "$SAMPLE_DIR" "$CORPUS_DIR"
overwrite=()
[ "$OVERWRITE" = 1 ] && overwrite=(--overwrite)
t_start=$SECONDS

# The first of the files that does not exist yet (else the last): a step that writes them all is done when
# this one exists.
first_missing() {
    local f
    for f in "$@"; do [ -e "$f" ] || { echo "$f"; return; }; done
    echo "${@: -1}"
}

# run_step NAME DONE_FILE COMMAND... : skip when DONE_FILE exists, else run with a log.
run_step() {
    local name="$1" done_file="$2"; shift 2
    local log="$RUN/logs/$name.log"
    if [ -e "$done_file" ] && [ "$OVERWRITE" != 1 ]; then
        echo "[run_all] $name: done already ($done_file), skipping"
        return 0
    fi
    echo "[run_all] $name: running (log: $log)"
    local t0=$SECONDS
    if ! "$@" > >(tee "$log") 2> >(tee -a "$log" >&2); then
        echo "[run_all] FAILED at step '$name'. See its log: $log" >&2
        exit 1
    fi
    echo "[run_all] $name: finished in $((SECONDS - t0)) s"
}

# 0. the built-in sample (cached in SAMPLE_DIR: a rerun does not regenerate it): the task's processes, then
#    the pretraining corpus (corpus processes already in the task keep the task's events)
corpus=()
for p in $PRETRAIN_PROCESSES; do [[ " $task_processes " == *" $p "* ]] || corpus+=("$p"); done
all_processes=($task_processes "${corpus[@]}")
raw=()
for p in "${all_processes[@]}"; do
    n="$EVENTS" dir="$SAMPLE_DIR"
    [[ " ${corpus[*]} " == *" $p "* ]] && n="$PRETRAIN_EVENTS" dir="$CORPUS_DIR"
    run_step "step0_$p" "$dir/$p.root" \
        python step0_generate.py --process "$p" --events "$n" --seed "$SEED" --workers "$WORKERS" --out "$dir/$p.root"
    raw+=("$dir/$p.root")
done

# 1. ROOT -> HDF5
h5=()
for p in "${all_processes[@]}"; do h5+=("$RUN/h5/$p.h5"); done
# a process that TASKS or PRETRAIN_PROCESSES moved between the task (EVENTS) and the corpus (PRETRAIN_EVENTS) has
# a converted file of this run made from its other ROOT file: every output after step0 is stale then
stale="$(python -c 'import sys; from pathlib import Path; from common.h5io import converted_from
h5, raw = sys.argv[1::2], sys.argv[2::2]
print(*(Path(f).stem for f, r in zip(h5, raw) if Path(f).exists() and not converted_from(f, r)))' \
    $(for i in "${!h5[@]}"; do echo "${h5[$i]} ${raw[$i]}"; done))"
if [ -n "$stale" ] && [ "$OVERWRITE" != 1 ]; then
    echo "[run_all] $stale: converted in $RUN from other ROOT files than this run's (TASKS or PRETRAIN_PROCESSES changed): redoing every step after step0"
    OVERWRITE=1 overwrite=(--overwrite)
fi
run_step step1_convert "$(first_missing "${h5[@]}")" \
    python step1_convert.py "${raw[@]}" --out-dir "$RUN/h5" --workers "$WORKERS" --seed "$SEED" "${overwrite[@]}"

# the sample's plots need only the ROOT files: drawn in the background at the lowest priority, so they take
# the core the tokenizer fit leaves idle at its end, not one it uses (the report waits for them)
run_step plot_sample "$RUN/plots/sample/m4l.png" \
    nice -n 19 python plotting/plot_sample.py "${raw[@]}" --out-dir "$RUN/plots/sample" &
plot_sample_pid=$!

# 2. tokenizers, then token sequences. The torch steps from here on run on mimalloc (env.sh); step0's
# detector code is a little slower on it (bench/README.md, "mimalloc")
preload_mimalloc
run_step step2_fit "$RUN/tok/met.json" \
    python step2_tokenize.py fit --h5 "${h5[@]}" --out-dir "$RUN/tok" --seed "$SEED" --workers "$WORKERS"
parquet=() task_parquet=()
for p in "${all_processes[@]}"; do parquet+=("$RUN/tokens/$p.parquet"); done
for p in $PROCESSES; do task_parquet+=("$RUN/tokens/$p.parquet"); done
run_step step2_apply "$(first_missing "${parquet[@]}")" \
    python step2_tokenize.py apply --h5 "${h5[@]}" --tokenizers "$RUN/tok" --out-dir "$RUN/tokens" \
        --cap "tracks=$TRACKS_IN_SEQUENCE" --seed "$SEED" "${overwrite[@]}"

# 3. masked-object pretraining on every process, task and corpus (train and validation splits only:
#    the test events of the task are never pretrained on). A backbone is reused only if it was pretrained on
#    every token file of this run: a process added to PRETRAIN_PROCESSES of a finished run is pretrained on, and the
#    classifiers on the backbone are trained again.
pretrained_on() {  # DIR FILES...: true when the step3 output in DIR read every one of FILES
    python -c 'import sys; from common.runtime import made_from; sys.exit(not made_from(sys.argv[1], sys.argv[2:]))' \
        "$1/metrics.json" "${@:2}"
}
redo_pretraining() {  # DIR FINETUNE_DIRS... : forget a backbone and the classifiers trained on it
    echo "[run_all] $1 was pretrained without some of this run's processes: pretraining again, and the classifiers on it"
    local d
    rm -f "$1/backbone.pt" "$1/metrics.json"
    for d in "${@:2}"; do rm -f "$d/metrics.json"; done
}
[ -e "$RUN/pretrain/metrics.json" ] && ! pretrained_on "$RUN/pretrain" "${parquet[@]}" &&
    redo_pretraining "$RUN/pretrain" "$RUN/finetune" "$RUN/finetune_generalisation" "$RUN/finetune_multiclass"
cpu_ranks=$(( WORKERS >= 2 ? 2 : 1 ))  # on CPU step3 runs as 2 ranks of one thread: 1.63x one process on 2 cores
objective=()
[ -n "$PRETRAIN_OBJECTIVE" ] && objective=(--objective "$PRETRAIN_OBJECTIVE")
run_step step3_pretrain "$RUN/pretrain/metrics.json" \
    python step3_pretrain.py --parquet "${parquet[@]}" --tokenizers "$RUN/tok" --h5-dir "$RUN/h5" \
        --out-dir "$RUN/pretrain" --epochs "$PRETRAIN_EPOCHS" --seed "$SEED" --device "$DEVICE" --cpu-ranks "$cpu_ranks" \
        "${objective[@]}"

# 4. fine-tuning and baselines on the main task, with the data-efficiency protocol;
#    then (GENERALISATION=1) the generalisation protocol: trained against the first background only, tested on all
if [[ " $TASKS " == *" binary "* ]]; then
    run_step step4_finetune "$RUN/finetune/metrics.json" \
        python step4_finetune.py --parquet "${task_parquet[@]}" --signal "$SIGNAL" --background "$BACKGROUND" \
            --init "$RUN/pretrain/backbone.pt" --h5-dir "$RUN/h5" --tokenizers "$RUN/tok" --seeds "$SEEDS" \
            --arms "$ARMS" --label-fractions "$LABEL_FRACTIONS" --fraction-arms "$FRACTION_ARMS" --out-dir "$RUN/finetune" \
            --seed "$SEED" --device "$DEVICE" --workers "$WORKERS" --weighting "$WEIGHTING"
    first_bkg="${BACKGROUND%%,*}"
    if [ "$GENERALISATION" = 1 ]; then
        run_step step4_generalisation "$RUN/finetune_generalisation/metrics.json" \
            python step4_finetune.py --parquet "${task_parquet[@]}" --signal "$SIGNAL" --background "$first_bkg" \
                --test-background "$BACKGROUND" --arms scratch,finetune,counts_gbdt,standard_gbdt --seeds "$SEEDS" \
                --init "$RUN/pretrain/backbone.pt" --h5-dir "$RUN/h5" --tokenizers "$RUN/tok" \
                --out-dir "$RUN/finetune_generalisation" --seed "$SEED" --device "$DEVICE" --workers "$WORKERS" \
                --weighting "$WEIGHTING"
    fi
fi

# 4a. the model variants (VARIANTS): feature-group sub-tokens and/or jet constituents, each pretrained on the same
#     corpus and fine-tuned on the same task, seeds and label fractions as the flat model (finetune/ above)
for v in $VARIANTS; do
    [ "$v" = flat ] && continue
    name="${v/+/_}" tok="$RUN/tok" tokens="$RUN/tokens" model=()
    [[ "$v" == group* ]] && tok="$RUN/tok_group" tokens="$RUN/tokens_group"
    [[ "$v" == *constituent ]] && model=(--constituents)
    vparquet=() vtask=()
    for p in "${all_processes[@]}"; do vparquet+=("$tokens/$p.parquet"); done
    for p in $PROCESSES; do vtask+=("$tokens/$p.parquet"); done
    if [[ "$v" == group* ]]; then
        run_step step2_fit_group "$tok/met.kinematics.json" \
            python step2_tokenize.py fit --granularity group --h5 "${h5[@]}" --out-dir "$tok" --seed "$SEED" --workers "$WORKERS"
        run_step step2_apply_group "$(first_missing "${vparquet[@]}")" \
            python step2_tokenize.py apply --h5 "${h5[@]}" --tokenizers "$tok" --out-dir "$tokens" \
                --cap "tracks=$TRACKS_IN_SEQUENCE" --seed "$SEED" "${overwrite[@]}"
    fi
    [ -e "$RUN/pretrain_$name/metrics.json" ] && ! pretrained_on "$RUN/pretrain_$name" "${vparquet[@]}" &&
        redo_pretraining "$RUN/pretrain_$name" "$RUN/finetune_$name"
    run_step "step3_$name" "$RUN/pretrain_$name/metrics.json" \
        python step3_pretrain.py --parquet "${vparquet[@]}" --tokenizers "$tok" --h5-dir "$RUN/h5" \
            --out-dir "$RUN/pretrain_$name" --epochs "$PRETRAIN_EPOCHS" --seed "$SEED" --device "$DEVICE" \
            --cpu-ranks "$cpu_ranks" "${model[@]}" "${objective[@]}"
    run_step "step4_$name" "$RUN/finetune_$name/metrics.json" \
        python step4_finetune.py --parquet "${vtask[@]}" --signal "$SIGNAL" \
            --background "$BACKGROUND" --arms "$VARIANT_ARMS" --init "$RUN/pretrain_$name/backbone.pt" --h5-dir "$RUN/h5" \
            --tokenizers "$tok" --seeds "$SEEDS" --label-fractions "$LABEL_FRACTIONS" --out-dir "$RUN/finetune_$name" \
            --seed "$SEED" --device "$DEVICE" --workers "$WORKERS" --weighting "$WEIGHTING" "${model[@]}"
done

# 4b. the multi-class task (TASKS=multiclass): the Higgs production modes, every arm, the same protocols
if [[ " $TASKS " == *" multiclass "* ]]; then
    class_parquet=()
    for p in "${class_processes[@]}"; do class_parquet+=("$RUN/tokens/$p.parquet"); done
    run_step step4_multiclass "$RUN/finetune_multiclass/metrics.json" \
        python step4_finetune.py --parquet "${class_parquet[@]}" --classes "$CLASSES" \
            --init "$RUN/pretrain/backbone.pt" --h5-dir "$RUN/h5" --tokenizers "$RUN/tok" --seeds "$SEEDS" \
            --arms "$ARMS" --label-fractions "$LABEL_FRACTIONS" --fraction-arms "$FRACTION_ARMS" \
            --out-dir "$RUN/finetune_multiclass" --seed "$SEED" --device "$DEVICE" --workers "$WORKERS" --weighting "$WEIGHTING"
fi

# the report (always rebuilt: it is cheap), once the sample's plots (drawn beside step2) are there
wait "$plot_sample_pid" || exit 1  # its FAILED line is printed already
run_step report "" \
    python plotting/report.py --run-dir "$RUN" --sample-dir "$SAMPLE_DIR" --out "$RUN/report.html"

echo "[run_all] all steps done in $((SECONDS - t_start)) s. Report: $RUN/report.html"
