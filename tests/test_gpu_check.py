"""scripts/gpu_check.sh in dry mode (every step at toy size on the CPU) and the benchmark's MFU peak table."""
import os
import subprocess
import sys

import pytest

from helpers import ROOT, child_env

sys.path.insert(0, os.path.join(ROOT, 'scripts'))
import benchmark  # noqa: E402

SECTIONS = ('# GPU check report', '## Environment', '## CUDA tests', '## Speed goals', '| goal | measured | result |',
            '## Swin-T/S/B', '## GPU JPEG decoding', '## Input pipeline', '## torch.compile',
            '## Other model families', '## Checkpoint saves', '## Summary')


@pytest.mark.parametrize('name, dtype, tf32, peak', [
    ('NVIDIA H100 80GB HBM3', 'bf16', False, 989.4),   # SXM
    ('NVIDIA H100 PCIe', 'bf16', False, 756.5),
    ('NVIDIA H100 NVL', 'fp16', False, 835.5),
    ('NVIDIA H200', 'bf16', False, 989.4),
    ('NVIDIA A100-SXM4-80GB', 'fp32', True, 156.0),
    ('NVIDIA A100-SXM4-80GB', 'fp32', False, 19.5),
    ('NVIDIA L40S', 'bf16', False, 362.1),
    ('NVIDIA H100 something new', 'bf16', False, None),  # unknown names are not guessed from a fragment
])
def test_mfu_peak_is_looked_up_by_the_exact_device_name(name, dtype, tf32, peak):
    assert benchmark.peak_tflops(name, dtype, tf32) == peak


@pytest.mark.slow
def test_dry_run_writes_every_section_of_the_report(tmp_path):
    official = tmp_path / 'official' / 'swin_transformer.py'
    os.makedirs(official.parent)
    mirror = '/work/.mirror/microsoft+Swin-Transformer/repo'
    env = child_env()
    if os.path.isdir(mirror):  # the official model as a third column, when its code is at hand
        official.write_bytes(subprocess.run(['git', '-C', mirror, 'show', 'HEAD:models/swin_transformer.py'],
                                            capture_output=True, check=True).stdout)
        env['OFFICIAL_SWIN'] = str(official)
    out = tmp_path / 'out'
    result = subprocess.run(['bash', os.path.join(ROOT, 'scripts', 'gpu_check.sh'), str(out), '--dry'],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=4000)
    assert result.returncode == 0, result.stderr[-3000:]
    report = (out / 'gpu_report.md').read_text()
    for section in SECTIONS:
        assert section in report, section
    assert sorted(os.listdir(out)) == ['benchmark.log', 'data.log', 'gpu_report.md', 'tests.log']
    summary = report.split('## Summary')[1]
    failed = [line for line in summary.splitlines() if line.startswith('|') and ('FAILED' in line or 'TIMED' in line)]
    assert not failed, failed + [report[-6000:]]
    assert report.count('| Swin-toy ') >= 6  # goals (train, infer), grid (2 dtypes x 2 modes), compiled rows
    if 'OFFICIAL_SWIN' in env:
        assert 'official img/s' in report
    assert ' passed' in report.split('## CUDA tests')[1].split('##')[0]
    assert 'stall ratio background / synchronous: ' in report.split('## Checkpoint saves')[1]
