"""The published numbers the study is compared with (arXiv 2505.11711 and 2511.08567; see paper-facts)."""

# Table 1: update sparsity (%) at |Δ| ≤ 1e-5, public checkpoints, by algorithm
TABLE1 = {
    "dpo": [("Tulu-3-8B SFT→DPO", 81.4), ("Tulu-3-70B SFT→DPO", 95.2)],
    "grpo": [("deepseek-math-7b instruct→rl", 68.5), ("DeepSeek-V3-Base→R1-Zero", 86.0)],
    "orpo": [("Mistral-7B→mistral-orpo-beta", 76.9)],
    "kto": [("Eurus-7b sft→kto", 96.0), ("Llama-3-Base-8B-SFT→KTO", 81.2)],
    "ppo": [("mistral-7b-sft→math-shepherd-rl", 80.8)],
    "simpo": [("Llama-3-8B-Instruct→SimPO", 86.5)],
    "prime": [("Eurus-2-7B SFT→PRIME", 77.0)],
    "sft": [("SFT (Fig. 1, range)", "6-15")],
}
# Table 6: sparsity (%) at tolerances 1e-8 / 1e-7 / 1e-6 / 1e-5
TABLE6 = {
    "Tulu-3-8B-DPO": (76.04, 76.04, 76.14, 81.38),
    "deepseek-math-7b-rl": (68.14, 68.14, 68.14, 68.53),
    "Eurus-7b-kto": (71.78, 71.79, 73.14, 95.98),
    "math-shepherd-mistral-7b-rl (PPO)": (52.45, 52.47, 53.21, 80.77),
    "Llama-3-Instruct-8B-SimPO": (71.00, 71.00, 71.10, 76.42),
    "mistral-orpo-beta": (73.16, 73.18, 73.23, 76.94),
}
# Table 2: mean update rank (% of max rank)
TABLE2 = {"Tulu 8B (DPO)": 99.8, "Eurus 7B (PRIME)": 99.5, "Llama-3 8B (KTO)": 99.2, "DeepSeek Math 7B (GRPO)": 99.4}
# Table 3: θ_sub vs θ_full
TABLE3 = {"closeness_1e-5": {"dpo": 94.0, "prime": 90.5}, "closeness_1e-4": 100.0,
          "accuracy": {"dpo": (40.3, 41.9), "prime": (69.8, 72.2)}}
# Table 4: overlap (%): random o1/o2, RL o1/o2, sparsity s1/s2
TABLE4 = {
    "seed": {"random": (36.7, 36.7), "rl": (60.5, 60.6), "sparsity": (63.3, 63.3)},
    "data": {"random": (14.6, 36.7), "rl": (26.7, 67.1), "sparsity": (63.3, 85.4)},
    "algorithm": {"random": (23.0, 12.9), "rl": (59.1, 33.2), "sparsity": (87.1, 77.0)},
}
# Table 5: in-distribution data (sparsity %)
TABLE5 = [("Qwen2.5-Math-7B RFT", 91.2, "SFT", True), ("Qwen2.5-Math-7B RAFT++", 69.4, "SFT", True),
          ("Llama-3.1-8B-SFT SFT", 6.8, "SFT", False), ("Llama-3.1-8B-SFT DPO", 6.8, "RL", False),
          ("Zephyr-7b-Beta DPO", 7.7, "RL", False), ("Llama-3.1-8B-DPO DPO", 81.4, "RL", True)]
# §6: KL term (GRPO variant on Qwen-2.5-7B-Instruct)
KL = {"with KL": 69.8, "without KL": 68.8}
# 2511.08567 Table 1: sparsity_bf16 ranges
BF16 = {"SFT": "0.6-18.8", "RLVR": "36-92"}
