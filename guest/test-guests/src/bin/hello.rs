//! Test guest: prints a line on the console and exits with code 0.
#![no_std]
#![no_main]

mu2_guest::entry!(hello);

fn hello() {
    mu2_guest::println!("hello from the mu2 guest");
}
