// Per-page first-touch cost for ring-3 guest code, memory = shm file mapped MAP_PRIVATE (COW).
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec*1e6+t.tv_nsec/1e3;}
int main(int argc,char**argv){
  int ring=atoi(argv[1]); long pages=atol(argv[2]); int write=atoi(argv[3]); int reps=5;
  size_t sz=64<<20;
  int fd=open("/dev/shm/touchimg",O_RDWR|O_CREAT|O_TRUNC,0600); ftruncate(fd,sz);
  uint8_t*img=mmap(0,sz,PROT_READ|PROT_WRITE,MAP_SHARED,fd,0);
  uint64_t*pml4=(void*)(img+0x1000),*pdpt=(void*)(img+0x2000),*pd=(void*)(img+0x3000);
  pml4[0]=0x2000|7; pdpt[0]=0x3000|7; for(int k=0;k<32;k++) pd[k]=((uint64_t)k<<21)|0x87;
  memset(img+(4<<20),0x5a,sz-(4<<20));
  // rdi=base, rcx=pages; loop: mov [rdi], al  (or mov al,[rdi]); add rdi,4096; dec rcx; jnz; out 0x10; hlt
  uint8_t*c=img+0x8000; int i=0;
  if(write){c[i++]=0x88;c[i++]=0x07;} else {c[i++]=0x8a;c[i++]=0x07;}
  c[i++]=0x48;c[i++]=0x81;c[i++]=0xc7; uint32_t pg=4096; memcpy(c+i,&pg,4); i+=4;
  c[i++]=0x48;c[i++]=0xff;c[i++]=0xc9; c[i++]=0x75; c[i]=(uint8_t)(-(i+1)); i++; /* rel8 back to offset 0 */
  c[i++]=0xe6;c[i++]=0x10; c[i++]=0xf4;
  msync(img,sz,MS_SYNC);
  int kvm=open("/dev/kvm",O_RDWR);
  for(int rep=0;rep<reps;rep++){
    int vm=ioctl(kvm,KVM_CREATE_VM,0);
    uint8_t*mem=mmap(0,sz,PROT_READ|PROT_WRITE,MAP_PRIVATE,fd,0);
    struct kvm_userspace_memory_region r={0,0,0,sz,(uint64_t)mem}; ioctl(vm,KVM_SET_USER_MEMORY_REGION,&r);
    int vcpu=ioctl(vm,KVM_CREATE_VCPU,0); int msz=ioctl(kvm,KVM_GET_VCPU_MMAP_SIZE,0);
    struct kvm_run*run=mmap(0,msz,PROT_READ|PROT_WRITE,MAP_SHARED,vcpu,0);
    struct kvm_cpuid2*cp=calloc(1,sizeof(*cp)+100*sizeof(struct kvm_cpuid_entry2)); cp->nent=100;
    ioctl(kvm,KVM_GET_SUPPORTED_CPUID,cp); ioctl(vcpu,KVM_SET_CPUID2,cp);
    struct kvm_sregs s; ioctl(vcpu,KVM_GET_SREGS,&s);
    s.cr3=0x1000; s.cr4=0x20|0x600; s.cr0=0x80050033; s.efer=0x500;
    struct kvm_segment cs={.base=0,.limit=0xffffffff,.selector=ring?0x1b:0x8,.type=11,.present=1,.dpl=ring,.s=1,.l=1,.g=1};
    struct kvm_segment ds={.base=0,.limit=0xffffffff,.selector=ring?0x23:0x10,.type=3,.present=1,.dpl=ring,.db=1,.s=1,.g=1};
    s.cs=cs; s.ds=s.es=s.fs=s.gs=s.ss=ds; ioctl(vcpu,KVM_SET_SREGS,&s);
    struct kvm_regs g={0}; g.rip=0x8000; g.rsp=0x7000; g.rflags=2|(3<<12); g.rdi=4<<20; g.rcx=pages; ioctl(vcpu,KVM_SET_REGS,&g);
    double t0=now(); ioctl(vcpu,KVM_RUN,0); double t1=now();
    printf("ring %d %s pages %ld: exit=%d port=0x%x %.0f us (%.2f us/page)\n",ring,write?"write":"read",pages,run->exit_reason,run->io.port,t1-t0,(t1-t0)/(pages?pages:1));
    munmap(mem,sz); close(vcpu); close(vm);
  }
  return 0;}
