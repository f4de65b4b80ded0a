#!/usr/bin/env bash
# The GPU runs behind the README's H200 figures, in stages that each fit one 10-minute call of a leased machine:
#
#   bash bench/h200.sh OUTDIR STAGE...     (stages run in order; a failing stage does not stop the next)
#
# Run from the repository's root: the programs run as modules of the bench package (python -m bench.decode, ...).
#
#   env      GPU, driver, versions
#   tests    the generator tests on CUDA (Triton kernels compiled, CUDA graphs): ZMZOO_TEST_DEVICE=cuda pytest
#   ops      bench/probes/ops.py: kernel parity against the torch references at LLaMA-2-7B sizes, bandwidth fractions
#   ops-sweep  the same plus the decode kernel's launch-settings sweep (~4 min)
#   main     bench/decode.py: LLaMA-2-7B, random bf16 weights, batch 1: full and ZeroMerge (kv_budget 2048) at
#            4K, 16K, 40K (issues 2 and 4)
#   lookahead  plain ZeroMerge and the retrieval preset (kv_budget 2048) at $LOOKAHEAD_CONTEXTS (default 4K, 40K):
#            prefill time and peak with the preset's draft and rescore, decode speed ($LOOKAHEAD_METHODS to change)
#   phases   bench/probes/lookahead_phases.py: the retrieval preset's prefill against plain ZeroMerge, and where its
#            extra time goes (profiler ranges of the draft, the prompt lookup and the rescore) at $LOOKAHEAD_CONTEXTS
#   parity   bench/probes/parity_trace.py: the first step where the Triton path (compiled, CUDA graphs) and the torch
#            reference part, per method in $PARITY_METHODS (default knorm tova)
#   more     h2o and streaming (kv_budget 2048) at 4K..54K
#   more54   full and ZeroMerge at 54K
#   peers    HF transformers (static cache + compile) at $PEER_CONTEXTS (default 4K, 16K, 40K, 54K)
#   maxbatch the largest batch that fits at 40K (full, ZeroMerge) and its total tokens/s
#   gemv     main's table with --gemv $GEMV (default torch: every decode product by cuBLAS, the RMSNorm, SiLU gate and
#            residual add in inductor kernels beside; triton: all by the Triton GEMV with that work inside it), to set
#            beside main's, which runs zmzoo.load's default gemv=auto (per product whichever the tuning at load
#            measured faster); $GEMV_CONTEXTS, default 4K, 16K, 40K
#   quality  bench/quality.py on SmolLM2-135M-Instruct (all methods, 5/10/20 %, passkey to 8K, NLL at a 4K prompt):
#            needs .carry/a and .carry/b from scripts/gpu_carry.sh (the GGUF in two halves and the gguf wheel); $QUALITY_TASKS picks
#            the tasks (default passkey,nll,attn); $QUALITY_QUANTIZE the weights (default none: dequantized bf16, as
#            before; gguf: the file's Q4_1 kept; int8 / int4)
#   ruler    RULER's 11 tasks (bench/tasks/ruler.py) on SmolLM2 at 1K-8K ($RULER_LENGTHS), $RULER_SAMPLES samples
#            (default 2), every configuration of $QUALITY_METHODS at 5/10/20 %: one process per (task, length),
#            $RULER_JOBS (default 14) at a time on the one GPU (the eager harness is bound by the CPU's launches), each
#            in ruler_parts/TASK-LENGTH/ with --resume; then merged (bench.quality --merge) into ruler/. A run the
#            deadline stops goes on in the next call from RULER_FROM (a copy of the earlier ruler_parts/). Needs the
#            GGUF as quality does
#   profile  bench/probes/profile_decode.py: kernel-by-kernel profile and CUDA-graph timeline of the step
#            ($PROFILE_LAYERS layers at 7B widths, default 2; $PROFILE_CONTEXT, default 16K; $PROFILE_GEMV, default
#            auto; $PROFILE_CODE set: inductor's generated code in profile/code_METHOD.txt)
#   probe    bench/probes/overlap_probe.py: read bandwidth against size; L2 prefetch of the output projection during the
#            attention and insert of a ZeroMerge layer
#   prefill  bench/probes/profile_prefill.py: the 40K prompt's attention under each SDPA backend, and a profile of the
#            prefill of 2 layers at 7B widths ($PROFILE_METHODS, default full and zeromerge)
#   quant    weight-only quantization (docs/quantization.md): LLaMA-2-7B shapes, random weights, batch 1, for each of
#            $QUANT_MODES (default "none int8 int4"; int4 at group $QUANT_GROUP, default 64): ZeroMerge (kv_budget 2048)
#            at 40K and the full cache at 4K, decode tok/s and prefill time (quant_MODE_zeromerge/, quant_MODE_full/).
#            About 5 minutes a mode (two loads, two compiles, the GEMV tuning): one or two modes a call
#            QUANT_ACT=int8: every quant stage (quant, quant4k, quant70b) with --act-quant int8 (W8A8 / W4A8; its
#            folders and logs named _aint8), QUANT_NO_FULL=1: quant without its full-cache run
#   quant4k  the same at 4K in one call a mode: the full cache and ZeroMerge (kv_budget 2048) for each of $QUANT_MODES
#            (default "int8 none int4"), gpt-fast beside int8 ($QUANT4K_PEERS, default gptfast; needs .peers/gpt-fast):
#            the peer at int8 and the prefill time against bf16 at 4K
#   quant-tests  the quantization tests on CUDA (the qgemv and dequantize kernels compiled against their references,
#            the decode step compiled with CUDA graphs through them): ZMZOO_TEST_DEVICE=cuda pytest
#   quant70b llama2-70b shapes on one GPU, random weights built and quantized tensor by tensor, ZeroMerge (kv_budget
#            2048) at 40K, for each of $QUANT70B_MODES (default "int4 int8"; bf16, 128.5 GiB of weights, not tried): tok/s, prefill, peaks.
#            Several minutes a mode: one mode a call (QUANT70B_MODES=int4, then int8)
#   tp1      tensor parallelism at world size 1 (docs/tensor-parallel.md): bench/decode.py as one process and under
#            `torchrun --nproc-per-node 1` (the model loaded through the sharding path, zmzoo.parallel), in the order
#            $TP1_ORDER (default "plain torchrun"; runs numbered tp1_N_HOW/), for $TP1_METHODS (default zeromerge) at
#            $TP1_CONTEXTS (default 4K, 40K), with --gemv $TP1_GEMV (default auto)
#   tpcoll   bench/probes/tp_collectives.py under `torchrun --nproc-per-node 1`: the sharded decode step (residual add
#            after the product, one NCCL all-reduce after wo and w2) forced at world size 1, against the same run
#            without (tpcoll_1_skipped/, tpcoll_2_forced/); $TP1_METHODS, $TP1_CONTEXTS, --gemv $TP1_GEMV (default torch)
#
# DEADLINE (seconds, default 570) bounds the whole script: each stage gets the time left. Everything lands in OUTDIR
# (logs, results.json, PNGs) and is packed into OUTDIR/h200.tar.gz at the end.
set -u
out=${1:?usage: bash bench/h200.sh OUTDIR STAGE...}
shift
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1
deadline=$((SECONDS + ${DEADLINE:-570}))
py=${PYTHON:-python3}
decode=(-m bench.decode --model llama2-7b --weights random --batch 1 --kv-budget 2048 --ops triton -v)
act=() a8=""  # the quant stages with QUANT_ACT=int8: the quantized products' activations int8 too (--act-quant)
if [[ -n ${QUANT_ACT:-} ]]; then
    act=(--act-quant "$QUANT_ACT") a8="_a$QUANT_ACT"
fi

quality_methods=${QUALITY_METHODS:-full,zeromerge,zeromerge:retrieval,h2o,streaming,snapkv,tova,knorm}

smollm2_gguf() {  # the GGUF that scripts/gpu_carry.sh staged in two halves, joined and checked; its path on stdout
    local f=${TMPDIR:-/tmp}/smollm2-135m-instruct.gguf
    if [[ -f .carry/a/model.gguf.part && -f .carry/b/model.gguf.part ]]; then
        cat .carry/a/model.gguf.part .carry/b/model.gguf.part >"$f"
    fi
    if [[ ! -f $f ]] || [[ $(sha256sum "$f" | cut -d' ' -f1) != $(cat .carry/a/model.gguf.sha256) ]]; then
        echo "=== quality skipped: no intact GGUF (scripts/gpu_carry.sh, then carry .carry/a and .carry/b)" |
            tee -a "$out/summary.log" >&2
        return 1
    fi
    if ! "$py" -c "import gguf" 2>/dev/null; then
        local w deps=()
        for w in .carry/a/deps/*.whl; do  # gguf's requirements that this Python lacks
            [[ -f $w ]] || continue
            local name=${w##*/}
            "$py" -c "import importlib.metadata as m; m.version('${name%%-*}')" 2>/dev/null || deps+=("$w")
        done
        "$py" -m pip install --quiet --no-deps --no-index .carry/a/gguf-*.whl "${deps[@]}" >&2
    fi
    echo "$f"
}

run() {  # run NAME CMD...: the command under the time left, its output in OUTDIR/NAME.log
    local name=$1 left=$((deadline - SECONDS))
    shift
    if ((left < 20)); then
        echo "=== $name skipped: deadline" | tee -a "$out/summary.log"
        return
    fi
    echo "=== $name ($left s left): $*" | tee -a "$out/summary.log"
    local t0=$SECONDS
    timeout --kill-after=10 "$left" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    tail -n 60 "$out/$name.log"
    echo "=== $name rc=$rc in $((SECONDS - t0)) s" | tee -a "$out/summary.log"
}

for stage in "$@"; do
    case $stage in
    env)
        run env bash -c "nvidia-smi; $py -c 'import torch, triton; print(torch.__version__, triton.__version__, \
torch.cuda.get_device_name())'; $py -c 'import transformers; print(\"transformers\", transformers.__version__)'"
        ;;
    tests)
        run tests env ZMZOO_TEST_DEVICE=cuda "$py" -m pytest -q -p no:cacheprovider tests/test_generate.py \
            tests/ops/test_gemv.py tests/cache/test_baselines.py \
            -k "cuda_graph or cuda_lookahead or triton_generator or inductor or batch_rows or fused_prefill or fused_gemv or cuda"
        ;;
    ops)
        run ops "$py" -m bench.probes.ops --out "$out/ops" --no-sweep --budget-s 200
        ;;
    ops-sweep)
        run ops "$py" -m bench.probes.ops --out "$out/ops" --budget-s 240
        ;;
    main)
        run main "$py" "${decode[@]}" --contexts 4096,16384,40960 --methods zeromerge,full --peers none \
            --out "$out/main"
        ;;
    lookahead)
        run lookahead "$py" "${decode[@]}" --contexts "${LOOKAHEAD_CONTEXTS:-4096,40960}" \
            --methods "${LOOKAHEAD_METHODS:-zeromerge,zeromerge:retrieval}" --steps 32 --repeats 3 --peers none \
            --out "$out/lookahead"
        ;;
    phases)
        run phases "$py" -m bench.probes.lookahead_phases --model llama2-7b --contexts "${LOOKAHEAD_CONTEXTS:-4096,40960}" \
            --kv-budget 2048 --repeats 3 --out "$out/phases"
        ;;
    parity)
        for m in ${PARITY_METHODS:-knorm tova}; do
            run "parity_$m" "$py" -m bench.probes.parity_trace --method "$m" --kv-budget 16 --steps 48 --out "$out/parity_$m"
        done
        ;;
    more)
        run more "$py" "${decode[@]}" --contexts 4096,16384,40960,54000 --methods h2o,streaming --peers none \
            --out "$out/more"
        ;;
    more54)
        run more54 "$py" "${decode[@]}" --contexts 54000 --methods zeromerge,full --peers none --out "$out/more54"
        ;;
    gemv)
        run "gemv_${GEMV:-torch}" "$py" "${decode[@]}" --contexts "${GEMV_CONTEXTS:-4096,16384,40960}" \
            --methods zeromerge,full --gemv "${GEMV:-torch}" --peers none --out "$out/gemv_${GEMV:-torch}"
        ;;
    quality)
        if gguf_file=$(smollm2_gguf); then
            run quality "$py" -m bench.quality --model "$gguf_file" \
                --methods "$quality_methods" --budgets 0.05,0.1,0.2 \
                --tasks "${QUALITY_TASKS:-passkey,nll,attn}" --lengths 1024,2048,4096,8000 --depths 0,0.25,0.5,0.75,1 --trials 1 \
                --quantize "${QUALITY_QUANTIZE:-none}" \
                --filler both --answer-tokens 14 --nll-samples 4 --nll-prompt 4096 --nll-cont 256 --out "$out/quality"
        fi
        ;;
    ruler)
        if gguf_file=$(smollm2_gguf); then
            parts=$out/ruler_parts
            mkdir -p "$parts"
            [[ -n ${RULER_FROM:-} ]] && cp -r "$RULER_FROM"/. "$parts"/
            export gguf_file parts py quality_methods
            ruler_job() {  # ruler_job TASK LENGTH: one (task, length) of the table, resuming what its folder holds
                OMP_NUM_THREADS=1 "$py" -m bench.quality --model "$gguf_file" --tasks ruler --ruler-tasks "$1" \
                    --lengths "$2" --budgets 0.05,0.1,0.2 --methods "$quality_methods" \
                    --ruler-samples "${RULER_SAMPLES:-2}" --quantize "${QUALITY_QUANTIZE:-none}" --threads 1 \
                    --no-plot --resume --out "$parts/$1-$2" >>"$parts/$1-$2.log" 2>&1
                echo "$1 at $2: rc=$? $(grep -c '^\[quality\] ruler [0-9]' "$parts/$1-$2.log") prompts logged"
            }
            export -f ruler_job
            for n in ${RULER_LENGTHS:-8192 4096 2048 1024}; do  # the longest first: the last jobs to start are short
                for t in ${RULER_TASKS:-s1 s2 s3 mk1 mk2 mk3 mv mq vt cwe fwe}; do echo "$t $n"; done
            done >"$parts/jobs.txt"
            deadline=$((deadline - 40))  # the merge's time
            run ruler_jobs xargs -P "${RULER_JOBS:-14}" -L 1 bash -c 'ruler_job "$@"' _ <"$parts/jobs.txt"
            deadline=$((deadline + 40))
            run ruler_merge "$py" -m bench.quality --merge "$parts"/*/ --out "$out/ruler"
        fi
        ;;
    peers)
        run peers "$py" "${decode[@]}" --contexts "${PEER_CONTEXTS:-4096,16384,40960,54000}" --methods "" --peers hf --out "$out/peers"
        ;;
    maxbatch)
        run maxbatch "$py" "${decode[@]}" --contexts 40960 --methods full,zeromerge --max-batch \
            --max-batch-time 45 --peers none --out "$out/maxbatch"
        ;;
    profile)
        for m in ${PROFILE_METHODS:-full zeromerge}; do
            code=()
            if [[ -n ${PROFILE_CODE:-} ]]; then
                mkdir -p "$out/profile"
                code=(env TORCH_LOGS=output_code TORCH_LOGS_OUT="$out/profile/code_$m.txt")
            fi
            run "profile_${m}_${PROFILE_GEMV:-auto}" "${code[@]}" "$py" -m bench.probes.profile_decode --method $m --context "${PROFILE_CONTEXT:-16384}" \
                --layers "${PROFILE_LAYERS:-2}" --steps 10 --gemv "${PROFILE_GEMV:-auto}" --out "$out/profile"
        done
        ;;
    probe)
        run probe "$py" -m bench.probes.overlap_probe --out "$out/probe"
        ;;
    prefill)
        for m in ${PROFILE_METHODS:-full zeromerge}; do
            run "prefill_$m" "$py" -m bench.probes.profile_prefill --method $m --context 40960 --layers 2 --out "$out/prefill"
        done
        ;;
    quant)
        for q in ${QUANT_MODES:-none int8 int4}; do
            group=()
            [[ $q == int4 ]] && group=(--group-size "${QUANT_GROUP:-64}")
            run "quant_${q}${a8}_zeromerge" "$py" "${decode[@]}" --contexts 40960 --methods zeromerge --quantize "$q" \
                "${group[@]}" "${act[@]}" --steps 32 --repeats 3 --peers none --out "$out/quant_${q}${a8}_zeromerge"
            [[ -n ${QUANT_NO_FULL:-} ]] && continue
            run "quant_${q}${a8}_full" "$py" "${decode[@]}" --contexts 4096 --methods full --quantize "$q" \
                "${group[@]}" "${act[@]}" --steps 32 --repeats 3 --peers none --out "$out/quant_${q}${a8}_full"
        done
        ;;
    quant4k)
        for q in ${QUANT_MODES:-int8 none int4}; do
            group=() peers=none
            [[ $q == int4 ]] && group=(--group-size "${QUANT_GROUP:-64}")
            [[ $q == int8 ]] && peers=${QUANT4K_PEERS:-gptfast}
            run "quant4k_$q$a8" "$py" "${decode[@]}" --contexts 4096 --methods full,zeromerge --quantize "$q" \
                "${group[@]}" "${act[@]}" --steps 32 --repeats 3 --peers "$peers" --out "$out/quant4k_$q$a8"
        done
        ;;
    quant-tests)
        run quant_tests env ZMZOO_TEST_DEVICE=cuda "$py" -m pytest -q -p no:cacheprovider tests/ops/test_quant.py tests/ops/test_qgemv_a8.py \
            tests/ops/test_qgemv.py tests/models/test_quantized.py
        ;;
    quant70b)
        for q in ${QUANT70B_MODES:-int4 int8}; do
            group=()
            [[ $q == int4 ]] && group=(--group-size "${QUANT_GROUP:-64}")
            run "quant70b_$q" "$py" -m bench.decode --model llama2-70b --weights random --batch 1 --kv-budget 2048 \
                --ops triton -v --contexts 40960 --methods zeromerge --quantize "$q" "${group[@]}" "${act[@]}" \
                --steps 16 --repeats 3 --peers none --out "$out/quant70b_$q$a8"
        done
        ;;
    tp1)
        i=0
        for how in ${TP1_ORDER:-plain torchrun}; do
            i=$((i + 1))
            launch=("$py")
            [[ $how == torchrun ]] && launch=("$py" -m torch.distributed.run --standalone --nproc-per-node 1)
            run "tp1_${i}_$how" "${launch[@]}" "${decode[@]}" --contexts "${TP1_CONTEXTS:-4096,40960}" \
                --methods "${TP1_METHODS:-zeromerge}" --gemv "${TP1_GEMV:-auto}" --peers none --out "$out/tp1_${i}_$how"
        done
        ;;
    tpcoll)
        i=0
        for how in skipped forced; do
            i=$((i + 1))
            flag=()
            [[ $how == skipped ]] && flag=(--no-force)
            run "tpcoll_${i}_$how" "$py" -m torch.distributed.run --standalone --nproc-per-node 1 \
                -m bench.probes.tp_collectives "${flag[@]}" "${decode[@]:2}" --contexts "${TP1_CONTEXTS:-4096,40960}" \
                --methods "${TP1_METHODS:-zeromerge}" --gemv "${TP1_GEMV:-torch}" --peers none \
                --out "$out/tpcoll_${i}_$how"
        done
        ;;
    *)
        echo "unknown stage $stage" | tee -a "$out/summary.log"
        ;;
    esac
done
tar -czf "$out/h200.tar.gz" --exclude=h200.tar.gz -C "$out" . 2>/dev/null
cat "$out/summary.log"
