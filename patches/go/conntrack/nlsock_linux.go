//go:build linux
// +build linux

/*
Copyright 2026 The Kubernetes Authors.

Licensed under the Apache License, Version 2.0 (the "License");
you may not use this file except in compliance with the License.
You may obtain a copy of the License at

    http://www.apache.org/licenses/LICENSE-2.0

Unless required by applicable law or agreed to in writing, software
distributed under the License is distributed on an "AS IS" BASIS,
WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
See the License for the specific language governing permissions and
limitations under the License.
*/

package conntrack

// This file owns the NETLINK_NETFILTER socket: a streaming filtered dump and a
// batched delete. It holds no policy; callers decide what to dump and delete.

import (
	"errors"
	"fmt"
	"syscall"
	"time"
)

const (
	// recvBufferSize is the per-recvmsg buffer; dumps stream through it, so
	// memory stays flat whatever the table size (upstream materialises every flow).
	recvBufferSize = 1 << 16
	// socketTimeout bounds every blocking read so a lost reply cannot hang cleanup.
	socketTimeout = 5 * time.Second
)

// ctnlSocket is one NETLINK_NETFILTER socket in the caller's network namespace.
type ctnlSocket struct {
	fd  int
	seq uint32
}

func openCTNetlink() (*ctnlSocket, error) {
	fd, err := syscall.Socket(syscall.AF_NETLINK, syscall.SOCK_RAW|syscall.SOCK_CLOEXEC, syscall.NETLINK_NETFILTER)
	if err != nil {
		return nil, fmt.Errorf("opening ctnetlink socket: %w", err)
	}
	s := &ctnlSocket{fd: fd, seq: uint32(time.Now().UnixNano())}
	tv := syscall.NsecToTimeval(socketTimeout.Nanoseconds())
	if err := syscall.SetsockoptTimeval(fd, syscall.SOL_SOCKET, syscall.SO_RCVTIMEO, &tv); err != nil {
		s.Close()
		return nil, fmt.Errorf("setting ctnetlink receive timeout: %w", err)
	}
	if err := syscall.Bind(fd, &syscall.SockaddrNetlink{Family: syscall.AF_NETLINK}); err != nil {
		s.Close()
		return nil, fmt.Errorf("binding ctnetlink socket: %w", err)
	}
	return s, nil
}

// Close releases the socket.
func (s *ctnlSocket) Close() error { return syscall.Close(s.fd) }

func (s *ctnlSocket) nextSeq() uint32 { s.seq++; return s.seq }

func (s *ctnlSocket) send(b []byte) error {
	return syscall.Sendto(s.fd, b, 0, &syscall.SockaddrNetlink{Family: syscall.AF_NETLINK})
}

func (s *ctnlSocket) recv(buf []byte) ([]byte, error) {
	for attempt := 0; attempt < 3; attempt++ {
		n, _, err := syscall.Recvfrom(s.fd, buf, 0)
		if errors.Is(err, syscall.EINTR) {
			continue
		}
		if err != nil {
			return nil, err
		}
		return buf[:n], nil
	}
	return nil, syscall.EINTR
}

// dump streams the entries matching f to visit; only those cross into
// userspace because the kernel applies the CTA_FILTER.
func (s *ctnlSocket) dump(f DumpFilter, visit func(Flow)) error {
	req, err := encodeDumpRequest(s.nextSeq(), f)
	if err != nil {
		return err
	}
	if err := s.send(req); err != nil {
		return fmt.Errorf("sending conntrack dump request: %w", err)
	}
	buf := make([]byte, recvBufferSize)
	var interrupted error
	// Bounded: the kernel ends every dump with NLMSG_DONE; a timeout ends a
	// lost one (socketTimeout), so this loop cannot spin forever.
	for {
		b, err := s.recv(buf)
		if err != nil {
			return fmt.Errorf("reading conntrack dump: %w", err)
		}
		done, derr := decodeDumpBuffer(b, visit)
		if errors.Is(derr, errDumpInterrupted) {
			interrupted = derr
		} else if derr != nil {
			return fmt.Errorf("decoding conntrack dump: %w", derr)
		}
		if done {
			return interrupted
		}
	}
}

// kernelTable is the flowTable of the caller's network namespace. It opens a
// socket per call so that nothing is held open between syncs.
type kernelTable struct{}

func (kernelTable) dumpFlows(f DumpFilter, visit func(Flow)) error {
	s, err := openCTNetlink()
	if err != nil {
		return err
	}
	defer s.Close()
	// A dump the kernel marks interrupted is repeated a bounded number of
	// times; the last partial result is still used, as upstream does for EINTR.
	for attempt := 0; ; attempt++ {
		var flows []Flow
		err = s.dump(f, func(fl Flow) { flows = append(flows, fl) })
		if err == errDumpInterrupted && attempt < 2 {
			continue
		}
		for _, fl := range flows {
			visit(fl)
		}
		if err == errDumpInterrupted {
			return nil
		}
		return err
	}
}
