#!/usr/bin/env bash
# The main job on the built-in scene, CPU only: set up, render the scene, train `ns-train gaussianvae`
# through resolution stages, train the VAE and refine, export a PLY.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"

DATA=data/synthetic
OUT=outputs
if [ ! -f "$DATA/transforms_train.json" ]; then
  gvae-synthetic --out "$DATA" --resolution 256 --n-train 60 --n-val 4 --n-test 10 --n-points 100000
fi
mapfile -t FLAGS < <(sed -e 's/#.*//' -e '/^[[:space:]]*$/d' configs/cpu-demo.args | tr ' ' '\n' | sed '/^$/d')
start=$(date +%s)
ns-train gaussianvae --output-dir "$OUT" --experiment-name synthetic --machine.device-type cpu "${FLAGS[@]}" \
  blender-data --data "$DATA"
RUN=$(ls -td "$OUT"/synthetic/gaussianvae/*/ | head -n 1)
RUN=${RUN%/}
ns-export gaussian-splat --load-config "$RUN/config.yml" --output-dir "$RUN/export"
gvae-lineage "$RUN" >/dev/null
echo
echo "Done in $(( $(date +%s) - start )) s. The run is $RUN:"
echo "  checkpoint   $RUN/nerfstudio_models/"
echo "  lineage      $RUN/lineage.npz (report: $RUN/lineage_report.png)"
echo "  refinement   $RUN/refinement.pt (VAE: $RUN/vae.pt)"
echo "  PLY          $RUN/export/splat.ply (refined; GVAE_REFINED=0 ns-export ... for the original)"
echo "View it:       .venv/bin/ns-viewer --load-config $RUN/config.yml --viewer.websocket-host 127.0.0.1   (then open http://127.0.0.1:7007)"
echo "Export again:  .venv/bin/ns-export gaussian-splat --load-config $RUN/config.yml --output-dir exports/"
echo "Refine again:  .venv/bin/gvae-refine --load-config $RUN/config.yml --stages 3 --select all"
