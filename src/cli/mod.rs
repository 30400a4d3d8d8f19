pub mod finetune;
