fn main() { ibot::hello().print(); println!("threads {}", tch::get_num_threads()); }
