#!/usr/bin/env bash
# train.py's own data wait per workload and decoder (issue 15's train.py rows), on bench_nvdec.py's packed footage
# listed 20 times (48 videos -> 960 a epoch): ViT-B/16 finetuning at 16 clips/GPU and pretraining at 64 clips/GPU
# (4 videos x repeat_aug 16), each with --decoder nvdec and dali. Prints clips/s and data-wait share from log.jsonl.
#   bash benchmarks/train_data_wait.sh /root/bench_nvdec $OUT      # after bench_nvdec.py --work-dir /root/bench_nvdec
#   MODELS=vit_h DECODERS=nvdec bash benchmarks/train_data_wait.sh ...   # ViT-H/14 at the reference recipes' batches
#   EXTRA="--augment_ahead 0" TAG=inline bash benchmarks/train_data_wait.sh ...   # more flags; run folders get _TAG
set -uo pipefail
work=$1; out=$2; steps=${STEPS:-40}
mkdir -p "$out"
set_dir=$(dirname "$(find "$work" -name manifest.csv | grep -v mixed | head -1)")
tars=$(ls "$set_dir"/*.tar | tr '\n' ',')
pattern="{$(for _ in $(seq 20); do printf '%s' "$tars"; done | sed 's/,$//')}"
tag=${TAG:+_$TAG}
read -r -a extra <<< "${EXTRA:-}"
common=("${extra[@]}" --num_frames 16 --img_size 224 --t_patch_size 2 --max_steps_per_epoch "$steps" --epochs 1 --log_interval 10
        --warmup_epochs 0 --train_shards "$pattern")
if [ "${MODELS:-vit_b}" = vit_h ]; then
  # ViT-H/14 with the reference recipes' per-GPU batches: finetuning 8 clips, pretraining 1 video x repeat_aug 16
  for decoder in ${DECODERS:-nvdec}; do
    python3 train.py --mode finetune --model vit_huge_patch14 --num_classes 400 --batch_size_per_gpu 8 \
      --sampling_rate 4 --rand_aug --mixup 0.8 --cutmix 1.0 --val_shards "$set_dir" --test_num_ensemble_views 1 \
      --test_num_spatial_crops 1 --decoder "$decoder" --output_dir "$out/hft_$decoder$tag" "${common[@]}" \
      > "$out/hft_$decoder$tag.log" 2>&1
    python3 train.py --mode pretrain --model mae_vit_huge_patch14 --batch_size_per_gpu 1 --repeat_aug 16 \
      --sampling_rate 8 --mask_ratio 0.9 --pred_t_dim 16 --decoder "$decoder" --output_dir "$out/hpt_$decoder$tag" \
      "${common[@]}" > "$out/hpt_$decoder$tag.log" 2>&1
  done
else
for decoder in ${DECODERS:-nvdec dali}; do
  python3 train.py --mode finetune --model vit_base_patch16 --num_classes 400 --batch_size_per_gpu 16 \
    --sampling_rate 4 --rand_aug --mixup 0.8 --cutmix 1.0 --val_shards "$set_dir" --test_num_ensemble_views 1 \
    --test_num_spatial_crops 1 --decoder "$decoder" --output_dir "$out/ft_$decoder$tag" "${common[@]}" > "$out/ft_$decoder$tag.log" 2>&1
  python3 train.py --mode pretrain --model mae_vit_base_patch16 --batch_size_per_gpu 4 --repeat_aug 16 \
    --sampling_rate 8 --mask_ratio 0.9 --pred_t_dim 16 --decoder "$decoder" --output_dir "$out/pt_$decoder$tag" \
    "${common[@]}" > "$out/pt_$decoder$tag.log" 2>&1
done
fi
python3 - "$out" <<'PY'
import json, pathlib, sys
for run in sorted(pathlib.Path(sys.argv[1]).glob("*_*/log.jsonl")):
    rows = [json.loads(l) for l in run.read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"][1:]  # the first interval holds start-up
    if not train:
        print(run.parent.name, "no train records"); continue
    wait = sum(r["data_wait_frac"] for r in train) / len(train)
    rate = sum(r["clips_per_s"] for r in train) / len(train)
    print(f"{run.parent.name:10s} clips/s {rate:7.1f}  data wait {100 * wait:5.1f} %  ({len(train)} intervals after the first)")
PY
