"""A tiny random diffusers StableDiffusion3Pipeline saved to a folder (torch side of
the SD3 tests; tokenizers written offline by tests/tokenizer_fixtures)."""

import os

import torch

from tests import tokenizer_fixtures


def tiny_sd3_pipeline(tmp, *, t5=True, dual=(0,), qk_norm="rms_norm", shift=3.0,
                     dynamic=False, seed=0, diffusers_test_config=False):
  """A tiny random diffusers SD3 pipeline (torch modules); `diffusers_test_config`
  takes the sizes of diffusers' own SD3 pipeline test (legacy CLIP eos id 2, one-level
  VAE without quant convs, patch 1, one block)."""
  from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler,
                         SD3Transformer2DModel, StableDiffusion3Pipeline as TorchPipeline)
  from transformers import (CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer,
                            T5Config, T5EncoderModel, AutoTokenizer)
  torch.manual_seed(seed)
  tok_dir = os.path.join(tmp, "tokenizers")
  tokenizer_fixtures.write_clip_tokenizer(os.path.join(tok_dir, "clip"))
  tokenizer_fixtures.write_clip_tokenizer(os.path.join(tok_dir, "clip_g"), pad_token="!")
  tokenizer_fixtures.write_t5_tokenizer(os.path.join(tok_dir, "t5"))
  tokenizer = CLIPTokenizer.from_pretrained(os.path.join(tok_dir, "clip"), local_files_only=True)
  tokenizer_2 = CLIPTokenizer.from_pretrained(os.path.join(tok_dir, "clip_g"),
                                              local_files_only=True)
  vocab = max(len(tokenizer), len(tokenizer_2)) + 7
  clip_l = CLIPTextModelWithProjection(CLIPTextConfig(
      vocab_size=vocab, hidden_size=16, intermediate_size=40, num_hidden_layers=3,
      num_attention_heads=2, max_position_embeddings=77, hidden_act="quick_gelu",
      projection_dim=16, bos_token_id=tokenizer.bos_token_id,
      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
  clip_g = CLIPTextModelWithProjection(CLIPTextConfig(
      vocab_size=vocab, hidden_size=24, intermediate_size=48, num_hidden_layers=3,
      num_attention_heads=2, max_position_embeddings=77, hidden_act="gelu",
      projection_dim=32, bos_token_id=tokenizer_2.bos_token_id,
      eos_token_id=tokenizer_2.eos_token_id, pad_token_id=tokenizer_2.pad_token_id))
  if diffusers_test_config:
    clip_l = CLIPTextModelWithProjection(CLIPTextConfig(
        bos_token_id=0, eos_token_id=2, hidden_size=32, intermediate_size=37,
        layer_norm_eps=1e-05, num_attention_heads=4, num_hidden_layers=5, pad_token_id=1,
        vocab_size=vocab, hidden_act="gelu", projection_dim=32))
    clip_g = CLIPTextModelWithProjection(clip_l.config)
  transformer = SD3Transformer2DModel(
      sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
      num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
      pooled_projection_dim=48, out_channels=4, pos_embed_max_size=16,
      dual_attention_layers=dual, qk_norm=qk_norm)
  if diffusers_test_config:
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8,
        num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
        pooled_projection_dim=64, out_channels=4)
  with torch.no_grad():  # random, non-zero everything (zero-initialised layers too)
    for p in transformer.parameters():
      p.normal_(0, 0.3)
  vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16),
                      down_block_types=("DownEncoderBlock2D",) * 2,
                      up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1,
                      latent_channels=4, norm_num_groups=8, sample_size=32,
                      scaling_factor=1.5305, shift_factor=0.0609)
  if diffusers_test_config:
    vae = AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,),
                        layers_per_block=1, latent_channels=4, norm_num_groups=1,
                        use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609,
                        scaling_factor=1.5035)
  text_encoder_3 = tokenizer_3 = None
  if t5:
    tokenizer_3 = AutoTokenizer.from_pretrained(os.path.join(tok_dir, "t5"),
                                                local_files_only=True)
    text_encoder_3 = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_3) + 5, d_model=32, d_kv=8, d_ff=40, num_layers=2,
        num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=16,
        feed_forward_proj="gated-gelu", decoder_start_token_id=0, pad_token_id=0,
        eos_token_id=1))
  scheduler = FlowMatchEulerDiscreteScheduler(shift=shift, use_dynamic_shifting=dynamic)
  pipe = TorchPipeline(transformer=transformer, scheduler=scheduler, vae=vae,
                       text_encoder=clip_l, tokenizer=tokenizer, text_encoder_2=clip_g,
                       tokenizer_2=tokenizer_2, text_encoder_3=text_encoder_3,
                       tokenizer_3=tokenizer_3)
  for module in (transformer, vae, clip_l, clip_g, text_encoder_3):
    if module is not None:
      module.eval()  # built from configs they start in training mode (T5 dropout)
  pipe.set_progress_bar_config(disable=True)
  folder = os.path.join(tmp, "pipeline")
  pipe.save_pretrained(folder)
  return pipe, folder
